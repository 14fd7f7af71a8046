"""The adaptkit web page: predict with any registered task, run an image through all of them, compare costs, add a task.

Start it with ``adaptkit ui`` or ``python app/main.py [--registry PATH] [--host H] [--port P]``; ``gradio app/main.py``
hot-reloads the module-level ``demo``. Building the page touches nothing: the registry is opened and the backbone
loaded on first use, and the task picker is filled when a page loads.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from adaptkit.backbone import DEFAULT_BACKBONE
from adaptkit.backbone_info import MAX_IMAGE_SIZE
from adaptkit.models import PACKAGED_BACKBONE
from adaptkit.settings import bounds_of
from adaptkit.training import TrainConfig
from adaptkit_app import tables
from adaptkit_app.handlers import UPLOAD_HINT, Handlers
from adaptkit_app.training import METHOD_CHOICES, RANKED_METHODS, dataset_choices

__all__ = ["image_input", "build_app", "launch", "main", "demo", "MAX_BATCH"]

MAX_BATCH = 32  # prediction requests that share one backbone pass

CSS = """.upscaled img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
.prose strong { font-family: ui-sans-serif, system-ui, sans-serif; }
.table-wrap .cell-menu-button { display: none; }
"""  # Gradio's bold face covers only a few glyphs, so a bold run mixed two fonts; read-only tables need no menus
# A file that is not an image would show the browser's broken-image icon; the handler's message says what is wrong.
JS = """() => {
  const mark = (e, hidden) => {
    if (e.target.tagName === "IMG" && e.target.closest(".upscaled")) e.target.style.visibility = hidden ? "hidden" : "";
  };
  document.addEventListener("error", (e) => mark(e, true), true);
  document.addEventListener("load", (e) => mark(e, false), true);
}"""
INTRO = """# adaptkit
One frozen Vision Transformer, a small adapter per task. Pick a task and upload an image; switching the task re-runs
the same image at once. The backbone is loaded once and shared by every task on it."""


def image_input(**kwargs: Any) -> gr.Image:
    """An image input (upload, paste, webcam) that hands its handler the uploaded file's path, unopened.

    ``gr.Image`` decodes an upload before the handler runs, so a file that is not an image would fail there with no
    message of ours; :func:`adaptkit_app.handlers.open_image` reads it instead and says what is wrong. (The override
    is per instance: subclassing a Gradio component makes Gradio write a ``.pyi`` stub beside this module.)
    """
    image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"], **kwargs)
    image.preprocess = functools.partial(_uploaded_path, image)
    return image


def _uploaded_path(image: gr.Image, payload: Any) -> str | None:
    if payload is None or payload.path is None:
        return gr.Image.preprocess(image, payload)  # None, or an inline data: URL that gr.Image writes to a file
    return str(payload.path)


def build_app(registry: str | None = None, data_roots: Sequence[str | Path] | None = None,
              max_batch_size: int = MAX_BATCH, adapters: str | None = None) -> gr.Blocks:
    """The page over the registry at ``registry`` (a path or URL; default ``$ADAPTKIT_REGISTRY`` or ./registry.db).

    Args:
        registry: the registry's path or URL.
        adapters: its adapter store, a folder or ``s3://bucket/prefix`` (default: ``$ADAPTKIT_ADAPTERS`` or
            ``adapters/`` beside the registry).
        data_roots: the folders "Add a task" may train from (default: adaptkit's data folder, if any).
        max_batch_size: how many concurrent prediction requests go through the backbone together (1: one at a time).
    """
    h = Handlers(registry, data_roots=data_roots, adapters=adapters)
    roots = ", ".join(f"`{r}`" for r in h.data_roots) or "none (start the page with `--data-root PATH`)"
    with gr.Blocks(title="adaptkit") as demo:
        gr.Markdown(INTRO)
        empty_note = gr.Markdown(visible=False)
        with gr.Tabs():
            with gr.Tab("Predict", id="predict"):
                with gr.Row():
                    with gr.Column(min_width=400):  # side by side from about 900 px, else stacked
                        with gr.Row(equal_height=True):
                            task = gr.Dropdown(label="Task", choices=[], allow_custom_value=True, elem_id="task",
                                               scale=8)
                            reload = gr.Button("↻", size="sm", scale=0, min_width=44, elem_id="reload")
                        image = image_input(label="Image", height=320, elem_id="image", elem_classes="upscaled")
                        topk = gr.Slider(1, 10, value=5, step=1, label="Top-k labels")
                    with gr.Column(min_width=400):
                        labels = gr.Label(label="Prediction", elem_id="labels")
                        timing = gr.Markdown(UPLOAD_HINT, elem_id="timing")
            with gr.Tab("All tasks", id="all"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=280):  # side by side from about 900 px, else stacked
                        image_all = image_input(label="Image", height=280, elem_id="image-all",
                                                elem_classes="upscaled")
                        run_all = gr.Button("Run every task", variant="primary", elem_id="run-all")
                        all_note = gr.Markdown(elem_id="all-note")
                    with gr.Column(scale=2, min_width=560):
                        table_all = gr.Dataframe(tables.empty_all_tasks(), label="One row per task",
                                                 interactive=False, wrap=True, elem_id="table-all",
                                                 column_widths=["18%", "16%", "20%", "18%", "28%"])
            with gr.Tab("Compare", id="compare") as compare_tab:
                with gr.Row(equal_height=True):
                    summary = gr.Markdown(elem_id="summary")
                    refresh = gr.Button("Refresh", size="sm", scale=0, min_width=90, elem_id="compare-refresh")
                cost_table = gr.Dataframe(pd.DataFrame(columns=tables.COST_COLUMNS), interactive=False, wrap=True,
                                          label="Cost of each version against full fine-tuning (* the default)",
                                          elem_id="cost-table",
                                          column_widths=["12%", "12%", "12%", "18%", "13%", "13%", "20%"])
                with gr.Row():
                    params_plot = gr.BarPlot(x="task", y="parameters (K)", color="method",
                                             title="Trainable parameters per task (thousands)")
                    bytes_plot = gr.BarPlot(x="task", y="KB on disk", color="method",
                                            title="Adapter file per task (KB)")
                with gr.Row():
                    storage_plot = gr.BarPlot(x="setup", y="MB", color="part",
                                              title="Backbone + N adapters vs N full copies (MB)")
                    accuracy_plot = gr.ScatterPlot(x="trainable params (K)", y="test top-1 (%)", color="task",
                                                   tooltip=["task", "method", "trainable params (K)",
                                                            "test top-1 (%)"], y_lim=[0, 100],
                                                   title="Test accuracy vs trainable parameters")
                with gr.Accordion("Continual learning: every task with no task name given", open=False):
                    with gr.Row():
                        continual_limit = gr.Number(200, label="Test images per task (0: all)", precision=0,
                                                    minimum=0)
                        continual_btn = gr.Button("Evaluate in the order tasks were added", elem_id="continual")
                    continual_summary = gr.Markdown(elem_id="continual-summary")
                    continual_table = gr.Dataframe(label="Accuracy after each task is added", interactive=False)
            with gr.Tab("Add a task", id="add"):
                with gr.Row():
                    with gr.Column():
                        dataset = gr.Dropdown(dataset_choices(), value="digits", label="Data set",
                                              allow_custom_value=True, elem_id="dataset")
                        folder = gr.Textbox(label="Folder (one sub-folder of images per class)", visible=False,
                                            placeholder=f"a folder under {roots.replace('`', '')}", elem_id="folder",
                                            info=f"Folders this page may read: {roots.replace('`', '')}")
                        task_name = gr.Textbox(label="Task name", placeholder="default: the data set's name")
                        method = gr.Radio(METHOD_CHOICES, value="adapter", label="Method")
                        backbone = gr.Dropdown([PACKAGED_BACKBONE, DEFAULT_BACKBONE], value=PACKAGED_BACKBONE,
                                               allow_custom_value=True, label="Backbone (a timm ViT name)",
                                               elem_id="backbone",
                                               info=f"{PACKAGED_BACKBONE} ships with adaptkit and works offline; "
                                                    "others need the model hub or random weights")
                        pretrained = gr.Checkbox(True, label="Pretrained weights (from the package or the hub)",
                                                 elem_id="pretrained")
                        image_size = gr.Number(0, label="Image size in px (0: the backbone's own)", precision=0,
                                               minimum=0, elem_id="image-size",
                                               info=f"A whole number of patches, at most {MAX_IMAGE_SIZE}; the "
                                                    "task predicts at this size")
                    with gr.Column():
                        with gr.Row():
                            epochs = gr.Number(3, label="Epochs", precision=0,  # a quick first run
                                               minimum=bounds_of(TrainConfig, "epochs")[0])
                            batch_size = gr.Number(TrainConfig.batch_size, label="Batch size", precision=0,
                                                   minimum=bounds_of(TrainConfig, "batch_size")[0])
                        with gr.Row():
                            lr = gr.Number(0, label="Learning rate (0: the method's default)", minimum=0)
                            rank = gr.Number(0, label="Rank (0: the method's default)", precision=0, minimum=0)
                        with gr.Accordion("Quick run: fewer images", open=False):
                            limit_train = gr.Number(0, label="Training images (0: all)", precision=0, minimum=0)
                            limit_eval = gr.Number(0, label="Validation and test images (0: all)", precision=0,
                                                   minimum=0)
                        train_btn = gr.Button("Train", variant="primary", elem_id="train")
                        train_status = gr.Markdown("Pick a data set and press **Train**; progress shows here.",
                                                   elem_id="train-status", min_height=110)

        gr.on([demo.load, reload.click], h.tasks, inputs=task, outputs=[task, empty_note], api_name="tasks")
        gr.on([image.change, task.change, topk.release], h.predict, inputs=[image, task, topk],
              outputs=[labels, timing], api_name="predict", trigger_mode="always_last", batch=True,
              max_batch_size=max_batch_size, concurrency_limit=1)  # while a batch runs, the next one gathers
        image_all.change(h.predict_all, inputs=image_all, outputs=[table_all, all_note], api_name="predict_all",
                         trigger_mode="always_last")
        run_all.click(h.run_all, inputs=image_all, outputs=[table_all, all_note], api_visibility="private")
        gr.on([compare_tab.select, refresh.click], h.compare,
              outputs=[summary, cost_table, params_plot, bytes_plot, storage_plot, accuracy_plot], api_name="compare")
        continual_btn.click(h.continual, inputs=continual_limit, outputs=[continual_summary, continual_table],
                            api_name="continual", concurrency_limit=1)
        dataset.change(lambda d: gr.update(visible=d == "folder"), dataset, folder, api_visibility="private")
        method.change(lambda m: gr.update(visible=m in RANKED_METHODS), method, rank, api_visibility="private")
        busy = train_btn.click(lambda: (gr.update(interactive=False, value="Training..."), ""), None,
                               [train_btn, train_status], api_visibility="private", queue=False)
        trained = busy.then(h.train, inputs=[dataset, folder, task_name, method, epochs, batch_size, lr, rank,
                                             backbone, pretrained, limit_train, limit_eval, image_size],
                            outputs=[train_status, task, empty_note], api_name="train", concurrency_limit=1,
                            show_progress_on=train_status)
        for after in (trained.then, trained.failure):  # this Gradio skips .then after an error
            after(lambda: gr.update(interactive=True, value="Train"), None, train_btn, api_visibility="private",
                  queue=False)
    return demo


def _fewer_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas. Each Gradio worker thread that runs a batch would get its own arena (up to 8 per
    core), and batches of varying size left the server's memory drifting up by ~100 MB; with two it stays flat."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8: M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to cap
        pass


def launch(registry: str | None = None, host: str = "127.0.0.1", port: int | None = None,
           data_roots: Sequence[str | Path] | None = None, max_batch_size: int = MAX_BATCH,
           adapters: str | None = None, **kw: Any) -> gr.Blocks:
    """Build the page and serve it; returns the running Blocks (``prevent_thread_lock=True`` returns at once)."""
    _fewer_malloc_arenas()
    app = build_app(registry, data_roots=data_roots, max_batch_size=max_batch_size, adapters=adapters)
    kw.setdefault("css", CSS)
    kw.setdefault("js", JS)
    kw.setdefault("run_history", False)  # visitors' images are theirs: the server keeps no history of runs
    app.queue(default_concurrency_limit=2).launch(server_name=host, server_port=port, **kw)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python app/main.py", description=__doc__.splitlines()[0])
    parser.add_argument("--registry", help="registry path or URL (default: $ADAPTKIT_REGISTRY or ./registry.db)")
    parser.add_argument("--adapters", help="adapter store: a folder or s3://bucket/prefix (default: "
                        "$ADAPTKIT_ADAPTERS or adapters/ beside the registry)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--data-root", action="append", default=None, help="a folder the page may train from "
                        "(repeatable; default: adaptkit's data folder)")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="prediction requests per backbone pass")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    launch(args.registry, host=args.host, port=args.port, data_roots=args.data_root, max_batch_size=args.max_batch,
           adapters=args.adapters)


demo = build_app()

if __name__ == "__main__":
    main()

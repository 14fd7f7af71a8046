"""The adaptkit web page: predict with any registered task, run an image through all of them, compare costs, add a task.

Start it with ``adaptkit ui`` or ``python app/main.py [--registry PATH] [--host H] [--port P]``; ``gradio app/main.py``
hot-reloads the module-level ``demo``. Building the page touches nothing: the registry is opened and the backbone
loaded on first use, and the task picker is filled when a page loads.
"""

from __future__ import annotations

import argparse
import functools
import logging
from typing import Any

import gradio as gr
from adaptkit_app.handlers import METHOD_CHOICES, RANKED_METHODS, Handlers, dataset_choices

from adaptkit.backbone import DEFAULT_BACKBONE

__all__ = ["image_input", "build_app", "launch", "main", "demo"]

CSS = ".upscaled img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"
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


def build_app(registry: str | None = None) -> gr.Blocks:
    """The page over the registry at ``registry`` (a path or URL; default ``$ADAPTKIT_REGISTRY`` or ./registry.db)."""
    h = Handlers(registry)
    with gr.Blocks(title="adaptkit") as demo:
        gr.Markdown(INTRO)
        empty_note = gr.Markdown(visible=False)
        with gr.Tabs():
            with gr.Tab("Predict", id="predict"):
                with gr.Row():
                    with gr.Column():
                        task = gr.Dropdown(label="Task", choices=[], allow_custom_value=True, elem_id="task")
                        image = image_input(label="Image", height=320, elem_id="image", elem_classes="upscaled")
                        topk = gr.Slider(1, 10, value=5, step=1, label="Top-k labels")
                    with gr.Column():
                        labels = gr.Label(label="Prediction", elem_id="labels")
                        timing = gr.Markdown("Upload, paste or take a picture to see its labels.", elem_id="timing")
            with gr.Tab("All tasks", id="all"):
                with gr.Row():
                    with gr.Column(scale=1):
                        image_all = image_input(label="Image", height=280, elem_classes="upscaled",
                                                elem_id="all-image")
                        run_all = gr.Button("Run every task", variant="primary")
                    with gr.Column(scale=2):
                        table_all = gr.Dataframe(label="One row per task", interactive=False, wrap=True)
            with gr.Tab("Compare", id="compare") as compare_tab:
                refresh = gr.Button("Refresh", size="sm")
                summary = gr.Markdown()
                cost_table = gr.Dataframe(label="Cost of each version against full fine-tuning", interactive=False)
                with gr.Row():
                    params_plot = gr.BarPlot(x="task", y="parameters", color="method",
                                             title="Trainable parameters per task")
                    bytes_plot = gr.BarPlot(x="task", y="bytes on disk", color="method",
                                            title="Adapter bytes on disk per task")
                with gr.Row():
                    storage_plot = gr.BarPlot(x="setup", y="MB", color="part",
                                              title="One backbone plus N adapters against N full copies")
                    accuracy_plot = gr.ScatterPlot(x="trainable params", y="test top-1", color="method",
                                                   tooltip=["task", "trainable params", "test top-1"], y_lim=[0, 1],
                                                   title="Test accuracy against trainable parameters")
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
                                              allow_custom_value=True)
                        folder = gr.Textbox(label="Folder", placeholder="/path/to/images (a folder per class)",
                                            visible=False)
                        task_name = gr.Textbox(label="Task name", placeholder="default: the data set's name")
                        method = gr.Radio(METHOD_CHOICES, value="adapter", label="Method")
                        backbone = gr.Textbox(DEFAULT_BACKBONE, label="Backbone (a timm ViT name)")
                        pretrained = gr.Checkbox(True, label="Pretrained weights (from the hub or the package)")
                    with gr.Column():
                        with gr.Row():
                            epochs = gr.Number(3, label="Epochs", precision=0, minimum=1)
                            batch_size = gr.Number(64, label="Batch size", precision=0, minimum=1)
                        with gr.Row():
                            lr = gr.Number(0, label="Learning rate (0: the method's default)", minimum=0)
                            rank = gr.Number(0, label="Rank (0: the method's default)", precision=0, minimum=0)
                        with gr.Accordion("Quick run: fewer images", open=False):
                            limit_train = gr.Number(0, label="Training images (0: all)", precision=0, minimum=0)
                            limit_eval = gr.Number(0, label="Validation and test images (0: all)", precision=0,
                                                   minimum=0)
                        train_btn = gr.Button("Train", variant="primary")
                        train_status = gr.Markdown()

        gr.on([demo.load], h.tasks, inputs=task, outputs=[task, empty_note], api_name="tasks")
        gr.on([image.change, task.change, topk.release], h.predict, inputs=[image, task, topk],
              outputs=[labels, timing], api_name="predict", trigger_mode="always_last")
        gr.on([image_all.change, run_all.click], h.predict_all, inputs=image_all, outputs=table_all,
              api_name="predict_all", trigger_mode="always_last")
        gr.on([compare_tab.select, refresh.click], h.compare,
              outputs=[summary, cost_table, params_plot, bytes_plot, storage_plot, accuracy_plot], api_name="compare")
        continual_btn.click(h.continual, inputs=continual_limit, outputs=[continual_summary, continual_table],
                            api_name="continual", concurrency_limit=1)
        dataset.change(lambda d: gr.update(visible=d == "folder"), dataset, folder, api_visibility="private")
        method.change(lambda m: gr.update(visible=m in RANKED_METHODS), method, rank, api_visibility="private")
        train_btn.click(h.train, inputs=[dataset, folder, task_name, method, epochs, batch_size, lr, rank, backbone,
                                         pretrained, limit_train, limit_eval],
                        outputs=[train_status, task, empty_note], api_name="train", concurrency_limit=1)
    return demo


def launch(registry: str | None = None, host: str = "127.0.0.1", port: int | None = None, **kw: Any) -> gr.Blocks:
    """Build the page and serve it; returns the running Blocks (``prevent_thread_lock=True`` returns at once)."""
    app = build_app(registry)
    kw.setdefault("css", CSS)
    app.queue(default_concurrency_limit=2).launch(server_name=host, server_port=port, **kw)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python app/main.py", description=__doc__.splitlines()[0])
    parser.add_argument("--registry", help="registry path or URL (default: $ADAPTKIT_REGISTRY or ./registry.db)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    launch(args.registry, host=args.host, port=args.port)


demo = build_app()

if __name__ == "__main__":
    main()

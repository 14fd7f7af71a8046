"""What the web page does: each handler turns page inputs into adaptkit calls and their results into page values.

No ML and no SQL here: :class:`~adaptkit.predict.Predictor`, :class:`~adaptkit.registry.Registry`,
:func:`~adaptkit.compare.compare` and :func:`~adaptkit.train.train` do the work. Every handler is wrapped by
:func:`user_errors`, so an :class:`~adaptkit.errors.AdaptkitError` shows its own message on the page and anything
else a short one (with the traceback in the server log), never a traceback on the page.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd

from adaptkit.compare import CostReport, compare, format_bytes, format_percent
from adaptkit.data import list_datasets, open_image
from adaptkit.errors import AdaptkitError
from adaptkit.predict import Predictor
from adaptkit.registry import Registry, TaskRow
from adaptkit.train import TrainConfig, TrainEvent, train

__all__ = ["Handlers", "user_errors", "dataset_choices", "METHOD_CHOICES", "RANKED_METHODS"]

_log = logging.getLogger(__name__)

METHOD_CHOICES = ["adapter", "lora", "ssf", "bitfit", "vpt", "linear", "full"]
RANKED_METHODS = ("adapter", "lora")  # the methods that take a rank
EMPTY_NOTE = """### No tasks yet
The registry `{url}` has no tasks. Train one here in **Add a task** (for a quick offline try: data set `digits`,
backbone `vit_cifar_tiny_patch4_32.adaptkit_c10`, which ships with adaptkit), or from a shell:

```
adaptkit train --dataset digits --backbone vit_cifar_tiny_patch4_32.adaptkit_c10 --epochs 5 --no-augment --lr 3e-3
adaptkit train --dataset cifar100            # the default ViT-B/16 backbone, from the hub
```
Then come back to **Predict**: the new task appears in the picker."""


def user_errors(fn: Callable) -> Callable:
    """Show an AdaptkitError's message on the page; log anything else and show a short message instead."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except AdaptkitError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - the page must stay up whatever happens
            _log.exception("%s failed", fn.__name__)
            raise gr.Error(f"{fn.__name__.strip('_')} failed unexpectedly ({type(exc).__name__}); the server log "
                           "has the details.", print_exception=False) from None

    return wrapper


def task_label(task: TaskRow) -> str:
    """How a task reads in the picker: name, method, backbone and test accuracy of its default version."""
    v = task.default
    acc = v.metrics.get("test_top1")
    acc_text = f"test {acc:.1%}" if acc is not None else "not tested"
    return f"{task.name} · {v.method} · {v.backbone.name} · {acc_text}"


def dataset_choices() -> list[tuple[str, str]]:
    return [(f"{d.name} — {d.description}", d.name) for d in list_datasets()]


class Handlers:
    """The page's handlers over one registry and one shared Predictor, both made on first use.

    Args:
        registry: a registry path or URL; None means ``$ADAPTKIT_REGISTRY`` or ``./registry.db``.
        device: the Predictor's device (default: CUDA when available).
    """

    def __init__(self, registry: str | None = None, device: str | None = None) -> None:
        self.url = registry
        self.device = device
        self._registry: Registry | None = None
        self._predictor: Predictor | None = None
        self._lock = threading.RLock()  # the Predictor switches one active task at a time

    @property
    def registry(self) -> Registry:
        with self._lock:
            if self._registry is None:
                self._registry = Registry(self.url)
            return self._registry

    @property
    def predictor(self) -> Predictor:
        with self._lock:
            if self._predictor is None:
                self._predictor = Predictor(self.registry, device=self.device, max_backbones=2)
            return self._predictor

    # -- the task picker ---------------------------------------------------------------------------------------

    def _picker(self, value: str | None = None) -> tuple[dict, dict]:
        tasks = self.registry.tasks()
        choices = [(task_label(t), t.name) for t in tasks if t.versions]
        names = [name for _, name in choices]
        value = value if value in names else (names[0] if names else None)
        note = EMPTY_NOTE.format(url=self.registry.url)
        return gr.update(choices=choices, value=value), gr.update(value=note, visible=not names)

    @user_errors
    def tasks(self, current: str | None = None) -> tuple[dict, dict]:
        """Re-read the registry: the picker's tasks (keeping ``current``) and the empty-registry note."""
        with self._lock:
            if self._predictor is not None:
                self._predictor.refresh()
        return self._picker(current)

    # -- Predict and All tasks ---------------------------------------------------------------------------------

    @user_errors
    def predict(self, image: str | None, task: str | None, topk: float = 5) -> tuple[dict | None, str]:
        """Top-k labels of one image under one task, and how long that took."""
        if not task:
            return None, "Pick a task first (none is registered yet? see **Add a task**)."
        if image is None:
            return None, "Upload, paste or take a picture to see its labels."
        img = open_image(image)
        with self._lock:
            tick = time.perf_counter()
            ref = self.predictor.load(task).ref
            loaded = time.perf_counter() - tick
            tick = time.perf_counter()
            preds = self.predictor.predict([img], task, topk=int(topk))[0]
            took = time.perf_counter() - tick
        timing = f"`{ref}` predicted in **{took * 1000:.1f} ms** on {self.predictor.device.type}"
        if loaded > 0.001:
            timing += f" (loading the task first took {loaded * 1000:.0f} ms)"
        return {p.label: p.prob for p in preds}, timing + "."

    @user_errors
    def predict_all(self, image: str | None) -> pd.DataFrame:
        """One image through every task: one row each with its top label and probability."""
        columns = ["task", "method", "backbone", "top label", "probability", "note"]
        if image is None:
            return pd.DataFrame(columns=columns)
        img = open_image(image)
        tasks = [t for t in self.registry.tasks() if t.versions]
        rows, ready = {}, []
        with self._lock:
            for t in tasks:
                rows[t.name] = [t.name, t.default.method, t.default.backbone.name, "", None, ""]
                try:
                    self.predictor.load(t.name)
                    ready.append(t.name)
                except AdaptkitError as exc:  # one broken task must not hide the others
                    rows[t.name][5] = str(exc)
            if ready:
                for name, preds in zip(ready, self.predictor.predict_mixed([img] * len(ready), ready, topk=1),
                                       strict=True):
                    rows[name][3], rows[name][4] = preds[0].label, round(preds[0].prob, 4)
        return pd.DataFrame(list(rows.values()), columns=columns)

    # -- Compare -----------------------------------------------------------------------------------------------

    @user_errors
    def compare(self) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """The cost table of ``adaptkit compare``, its summary and the data of its four charts."""
        report = compare(self.registry)
        return (_summary(report), _cost_table(report), _per_task(report, "trainable_params", "parameters"),
                _per_task(report, "bytes", "bytes on disk"), _storage(report), _accuracy(report))

    # -- Add a task --------------------------------------------------------------------------------------------

    @user_errors
    def train(self, dataset: str, folder: str, task: str, method: str, epochs: float, batch_size: float,
              lr: float | None, rank: float | None, backbone: str, pretrained: bool, limit_train: float | None,
              limit_eval: float | None, progress: gr.Progress = gr.Progress()) -> tuple[str, dict, dict]:
        """Train a task, register it, and return a status line with the refreshed picker."""
        spec = _dataset_spec(dataset, folder)
        config = TrainConfig(epochs=int(epochs or 1), batch_size=int(batch_size or 64), lr=lr or None,
                             limit_train=int(limit_train) if limit_train else None,
                             limit_eval=int(limit_eval) if limit_eval else None)
        method_config = {"rank": int(rank)} if method in RANKED_METHODS and rank else None
        progress(0, desc="building the backbone and loading the data")
        result = train(spec, task=(task or "").strip() or None, backbone=(backbone or "").strip(),
                       pretrained=bool(pretrained), method=method, method_config=method_config, config=config,
                       registry=self.registry, on_event=_progress_reporter(progress))
        v = result.version
        with self._lock:
            self.predictor.refresh()
        status = (f"Trained **{v.task.name}** version {v.version}: {v.method} on {v.backbone.name}, "
                  f"{v.trainable_params:,} trainable parameters, {format_bytes(v.bytes)} on disk, test top-1 "
                  f"{format_percent(result.metrics.get('test_top1'))}. It is in the task picker now.")
        picker, note = self._picker(v.task.name)
        return status, picker, note


def _dataset_spec(dataset: str | None, folder: str | None) -> str:
    dataset, folder = (dataset or "").strip(), (folder or "").strip()
    if dataset == "folder":
        if not folder:
            raise gr.Error("Enter the folder's path (one sub-folder of images per class, or train/ and test/).",
                           print_exception=False)
        return f"folder:{folder}"
    if not dataset:
        raise gr.Error("Pick a data set.", print_exception=False)
    return dataset


def _progress_reporter(progress: gr.Progress) -> Callable[[TrainEvent], None]:
    def report(ev: TrainEvent) -> None:
        done = (ev.epoch - 1 + ev.step / max(ev.steps, 1)) / max(ev.epochs, 1)
        if ev.phase == "train":
            desc = f"epoch {ev.epoch}/{ev.epochs}: training, loss {ev.loss:.3f}, accuracy {ev.accuracy:.1%}"
        elif ev.phase == "val":
            desc, done = f"epoch {ev.epoch}/{ev.epochs}: validating", ev.epoch / max(ev.epochs, 1)
        else:
            desc, done = {"test": "testing the best epoch", "save": "saving to the registry"}[ev.phase], 1.0
        progress(min(done, 1.0), desc=desc)

    return report


def _summary(report: CostReport) -> str:
    if not report.tasks:
        return "No tasks yet: train one in **Add a task**, then the costs appear here."
    return (f"**{report.tasks} task(s)** on {report.backbones} backbone(s): {format_bytes(report.backbone_bytes)} of "
            f"backbone + {format_bytes(report.adapters_bytes)} of adapters = "
            f"**{format_bytes(report.shared_total_bytes)}**, "
            f"against **{format_bytes(report.full_total_bytes)}** for {report.tasks} fully fine-tuned copies: "
            f"**{report.saving:.1f}x smaller**. Trainable parameters: {report.adapters_params:,} against "
            f"{report.full_total_params:,}.")


def _cost_table(report: CostReport) -> pd.DataFrame:
    rows = [{
        "task": r.task, "version": r.version, "default": "yes" if r.default else "", "method": r.method,
        "backbone": r.backbone, "trainable params": r.trainable_params,
        "% of backbone": round(100 * r.share_of_backbone, 3), "on disk": format_bytes(r.bytes),
        "test top-1": format_percent(r.test_top1),
        "train time (s)": None if r.train_time_s is None else round(r.train_time_s, 1),
        "full params": r.full_params, "full on disk": format_bytes(r.full_bytes),
        "full test top-1": format_percent(r.full_test_top1) if r.full_measured else "not trained",
    } for r in report.rows]
    return pd.DataFrame(rows, columns=["task", "version", "default", "method", "backbone", "trainable params",
                                       "% of backbone", "on disk", "test top-1", "train time (s)", "full params",
                                       "full on disk", "full test top-1"])


def _per_task(report: CostReport, field: str, name: str) -> pd.DataFrame:
    rows = [{"task": r.task, name: getattr(r, field), "method": r.method} for r in report.rows if r.default]
    return pd.DataFrame(rows, columns=["task", name, "method"])


def _storage(report: CostReport) -> pd.DataFrame:
    shared = f"1 backbone + {report.tasks} adapters"
    full = f"{report.tasks} full copies"
    rows = [(shared, "backbone", report.backbone_bytes / 1e6), (shared, "adapters", report.adapters_bytes / 1e6),
            (full, "full copies", report.full_total_bytes / 1e6)]
    return pd.DataFrame(rows if report.tasks else [], columns=["setup", "part", "MB"])


def _accuracy(report: CostReport) -> pd.DataFrame:
    rows = [{"trainable params": r.trainable_params, "test top-1": r.test_top1, "method": r.method,
             "task": f"{r.task}@{r.version}"} for r in report.rows if r.test_top1 is not None]
    return pd.DataFrame(rows, columns=["trainable params", "test top-1", "method", "task"])

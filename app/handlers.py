"""What the web page does: each handler turns page inputs into adaptkit calls and their results into page values.

No ML and no SQL here: :class:`~adaptkit.inference.Predictor`, :class:`~adaptkit.registry.Registry`,
:func:`~adaptkit.compare.compare` and :func:`~adaptkit.train.train` do the work. Every handler is wrapped by
:func:`~adaptkit_app.wording.user_errors`, so an :class:`~adaptkit.errors.AdaptkitError` shows its own message on the
page (in the page's terms, without server paths) and anything else a short one (with the traceback in the server log),
never a traceback. The **Add a task** tab's inputs are read by :mod:`adaptkit_app.training`.

:meth:`Handlers.predict` is a batched Gradio event: concurrent requests, for any mix of tasks, arrive together and go
through the backbone in one :meth:`~adaptkit.inference.Predictor.predict_mixed` pass; a bad request in a batch gets its
own message and never fails the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from adaptkit.compare import compare, format_bytes, format_percent
from adaptkit.data.roots import resolve_roots
from adaptkit.errors import AdaptkitError, render
from adaptkit.inference import Predictor, left_out_note
from adaptkit.registry import Registry, TaskRow
from adaptkit.sizes import sized_name
from adaptkit.training import train
from adaptkit_app import inputs, tables, training
from adaptkit_app.inputs import PageInputError
from adaptkit_app.wording import open_upload, page_terms, page_words, user_errors

__all__ = ["Handlers", "task_label", "picker_choices", "UPLOAD_HINT", "AUTO", "AUTO_LABEL"]

_log = logging.getLogger(__name__)

AUTO = "*auto*"  # the picker's routed entry: not a valid task name, so it never shadows a task
AUTO_LABEL = "Auto: which task?"
MAX_TOPK = 1000  # labels shown per image: more than any task's classes is cut to the task's count
UPLOAD_HINT = "Upload, paste or take a picture to see its labels."
EMPTY_NOTE = """### No tasks yet
The registry `{url}` has no tasks. Train one here in **Add a task** (for a quick offline try: data set `digits`,
backbone `vit_cifar_tiny_patch4_32.adaptkit_c10`, which ships with adaptkit), or from a shell:

```
adaptkit train --dataset digits --backbone vit_cifar_tiny_patch4_32.adaptkit_c10 --epochs 5 --no-augment --lr 3e-3
adaptkit train --dataset cifar100            # the default ViT-B/16 backbone, from the hub
```
Then come back to **Predict**: the new task appears in the picker (or press ↻ beside it)."""

def task_label(task: TaskRow) -> str:
    """How a task reads in the picker: name, method, backbone and test accuracy of its default version."""
    if task.broken:
        return f"{task.name} · broken: {task.broken}"
    v = task.default
    acc = v.metrics.get("test_top1")
    acc_text = f"test {acc:.1%}" if acc is not None else "not tested"
    return f"{task.name} · {v.method} · {sized_name(v.backbone.name, v.backbone.data_config)} · {acc_text}"


def picker_choices(tasks: Sequence[TaskRow]) -> list[tuple[str, str]]:
    """(label, task name) for each task that has a default version; a task whose row cannot be read is marked."""
    choices = []
    for t in tasks:
        try:
            if t.default is not None:
                choices.append((task_label(t), t.name))
        except Exception:  # noqa: BLE001 - one unreadable row must not take the picker down
            _log.exception("task %s could not be listed", t.name)
            choices.append((f"{t.name} · unreadable (see the server log)", t.name))
    return choices


def _stamp(tasks: Sequence[TaskRow]) -> tuple:
    """What a task name resolves to, for every task: changes when any default version changes."""
    out = []
    for t in tasks:
        v = t.default
        out.append((t.name, None if v is None else (v.version, v.sha256)))
    return tuple(out)


class Handlers:
    """The page's handlers over one registry and one shared Predictor, both made on first use.

    Args:
        registry: a registry path or URL; None means ``$ADAPTKIT_REGISTRY`` or ``./registry.db``.
        adapters: its adapter store, a folder or ``s3://bucket/prefix``; None means ``$ADAPTKIT_ADAPTERS`` or
            ``adapters/`` beside the registry.
        device: the Predictor's device (default: CUDA when available).
        data_roots: the folders "Add a task" may train from (default:
            :func:`~adaptkit_app.training.default_data_roots`).
        sync_s: how often (seconds) predictions check the registry for tasks changed by other processes.
    """

    def __init__(self, registry: str | None = None, device: str | None = None,
                 data_roots: Sequence[str | Path] | None = None, sync_s: float = 2.0,
                 adapters: str | None = None) -> None:
        self.url = registry
        self.adapters = adapters
        self.device = device
        self.data_roots = resolve_roots(training.default_data_roots() if data_roots is None else data_roots)
        self.sync_s = sync_s
        self._registry: Registry | None = None
        self._predictor: Predictor | None = None
        self._lock = threading.RLock()  # made once: the registry and the predictor (which needs no lock to predict)
        self._stamp: tuple | None = None
        self._synced_at = float("-inf")

    @property
    def registry(self) -> Registry:
        with self._lock:
            if self._registry is None:
                self._registry = Registry(self.url, adapter_dir=self.adapters)
            return self._registry

    @property
    def predictor(self) -> Predictor:
        with self._lock:
            if self._predictor is None:
                self._predictor = Predictor(self.registry, device=self.device, max_backbones=2)
            return self._predictor

    def _sync(self, force: bool = False) -> list[TaskRow] | None:
        """Make task names resolve afresh if the registry changed (another process trained, removed, set a default)."""
        if not force and time.monotonic() - self._synced_at < self.sync_s:
            return None
        tasks = self.registry.tasks()
        stamp = _stamp(tasks)
        with self._lock:
            self._synced_at = time.monotonic()
            if stamp != self._stamp and self._predictor is not None:
                self._predictor.refresh()
            self._stamp = stamp
        return tasks

    # -- the task picker ---------------------------------------------------------------------------------------

    def _picker(self, value: str | None = None, tasks: Sequence[TaskRow] | None = None) -> tuple[dict, dict]:
        choices = picker_choices(self.registry.tasks() if tasks is None else tasks)
        names = [name for _, name in choices]
        value = value if value in names or (value == AUTO and names) else (names[0] if names else None)
        choices = [(AUTO_LABEL, AUTO), *choices] if names else choices
        note = EMPTY_NOTE.format(url=self.registry.url)
        return gr.update(choices=choices, value=value), gr.update(value=note, visible=not names)

    @user_errors
    def tasks(self, current: str | None = None) -> tuple[dict, dict]:
        """Re-read the registry: the picker's tasks (keeping ``current``) and the empty-registry note."""
        return self._picker(current, self._sync(force=True))

    # -- Predict and All tasks ---------------------------------------------------------------------------------

    @user_errors
    def predict(self, images: list[str | None], tasks: list[str | None],
                topks: list[float]) -> tuple[list[dict | None], list[str | dict]]:
        """Top-k labels of each request's image under its own task, all in one backbone pass (a batched event).

        Args:
            images, tasks, topks: one entry per request in the batch.

        Returns:
            the labels of each request (None where it failed) and a line saying how long it took or what went wrong.
        """
        if not all(isinstance(x, (list, tuple)) for x in (images, tasks, topks)) or \
                not len(images) == len(tasks) == len(topks):
            raise PageInputError("images, tasks and top-k need one entry per request each.")
        labels: list[dict | None] = [None] * len(images)
        notes: list[str | dict] = [gr.skip()] * len(images)  # no image: leave the line as it is (it may be an error)
        ready: list[tuple[int, Any, str]] = []
        ks = [5] * len(images)
        for i, (image, task, k) in enumerate(zip(images, tasks, topks, strict=True)):
            try:  # each request's fields are its own: a bad one fails that request only
                task, image = inputs.text("Task", task, max_len=200), inputs.upload(image)
                ks[i] = inputs.whole("Top-k labels", k, 1, MAX_TOPK, default=5)
                if not task:
                    notes[i] = "Pick a task first (none is registered yet? see **Add a task**)."
                elif image is not None:
                    ready.append((i, open_upload(image), task))
            except inputs.PageInputError as exc:
                notes[i] = f"**Could not predict:** {exc.message}"
            except AdaptkitError as exc:
                notes[i] = f"**Could not predict:** {page_terms(exc)}"
        if any(task != AUTO for _, _, task in ready):
            self._predict_ready([r for r in ready if r[2] != AUTO], ks, labels, notes)
        if any(task == AUTO for _, _, task in ready):
            self._predict_routed([r for r in ready if r[2] == AUTO], ks, labels, notes)
        return labels, notes

    def _predict_ready(self, ready: list[tuple[int, Any, str]], topks: list[int], labels: list, notes: list) -> None:
        self._sync()
        tick = time.perf_counter()
        loaded = []
        for i, img, task in ready:
            try:
                loaded.append((i, img, self.predictor.load(task).ref))
            except AdaptkitError as exc:  # a missing or broken task fails its own requests only
                notes[i] = f"**Could not predict:** {page_terms(exc)}"
        load_s = time.perf_counter() - tick
        if not loaded:
            return
        tick = time.perf_counter()
        preds = self.predictor.predict_mixed([img for _, img, _ in loaded], [ref for _, _, ref in loaded],
                                             topk=max(topks))
        took = time.perf_counter() - tick
        device, batch = self.predictor.device.type, f" in a batch of {len(loaded)}" if len(loaded) > 1 else ""
        for (i, _, ref), p in zip(loaded, preds, strict=True):
            labels[i] = {x.label: x.prob for x in p[:max(topks[i], 1)]}
            notes[i] = f"`{ref}` predicted in **{took * 1000:.1f} ms** on {device}{batch}"
            notes[i] += f" (loading first took {load_s * 1000:.0f} ms)." if load_s > 0.001 else "."

    def _predict_routed(self, ready: list[tuple[int, Any, str]], topks: list[int], labels: list,
                        notes: list) -> None:
        """The "Auto: which task?" requests: each image routed to its task, all in one routed pass."""
        self._sync()
        tick = time.perf_counter()
        try:
            routed = self.predictor.predict_auto([img for _, img, _ in ready], topk=max(topks))
        except AdaptkitError as exc:
            for i, _, _ in ready:
                notes[i] = f"**Could not predict:** {page_terms(exc)}"
            return
        took = time.perf_counter() - tick
        for (i, _, _), r in zip(ready, routed, strict=True):
            runner = f"; runner-up `{r.runner_up}` {r.runner_up_confidence:.1%}" if r.runner_up else ""
            if r.passed_over:
                runner = f"; the likelier `{r.passed_over}` ({r.runner_up_confidence:.1%}) does not fit this image"
            labels[i] = {p.label: p.prob for p in r.predictions[:max(topks[i], 1)]}
            notes[i] = (f"Routed to **`{r.task}`** ({r.confidence:.1%} sure{runner}), predicted in "
                        f"**{took * 1000:.1f} ms** on {self.predictor.device.type}.")
            if r.rejected:
                notes[i] = (f"**No task fits this image**: it is less typical of the nearest task, `{r.task}`, "
                            f"than {1 - r.fit:.1%} of that task's own images. The labels are that task's guesses. "
                            + notes[i])
            if r.left_out:
                note = render(left_out_note(r.left_out), page_words)
                notes[i] += f" {note[0].upper()}{note[1:]}."

    @user_errors
    def predict_all(self, image: str | None) -> tuple[pd.DataFrame, str]:
        """One image through every task: one row each with its top label and probability, and a note."""
        image = inputs.upload(image)
        if image is None:
            return tables.empty_all_tasks(), ""
        img = open_upload(image)
        tasks = [t for t in self.registry.tasks() if t.default is not None]
        if not tasks:
            return tables.empty_all_tasks(), "No tasks yet: train one in **Add a task**."
        self._sync()
        rows, ready = {}, []
        for t in tasks:
            if t.broken:  # one broken task must not hide the others
                rows[t.name] = [t.name, "", "", "", f"broken: {t.broken}"]
                continue
            rows[t.name] = [t.name, t.default.method, "", "", ""]
            try:
                self.predictor.load(t.name)
                ready.append(t.name)
            except AdaptkitError as exc:  # one broken task must not hide the others
                rows[t.name][4] = page_terms(exc)
        if ready:
            for name, preds in zip(ready, self.predictor.predict_mixed([img] * len(ready), ready, topk=1),
                                   strict=True):
                rows[name][2], rows[name][3] = preds[0].label, format_percent(preds[0].prob)
            self._mark_routed(img, ready, rows)
        return pd.DataFrame(list(rows.values()), columns=tables.ALL_TASKS_COLUMNS), f"{len(ready)} of {len(tasks)} " \
            "task(s) answered in one backbone pass."

    @user_errors
    def run_all(self, image: str | None) -> tuple[pd.DataFrame, str]:
        """The "Run every task" button: like :meth:`predict_all`, but says so when there is no image."""
        if image is None:
            return tables.empty_all_tasks(), "**Upload an image first**, then run every task on it."
        return self.predict_all(image)

    def _mark_routed(self, img: Any, ready: list[str], rows: dict[str, list]) -> None:
        """Note the task the router would send the image to, among the tasks with routing statistics, and the tasks
        it left out for lacking them."""
        try:
            route = self.predictor.route([img], ready)[0]
        except AdaptkitError as exc:
            _log.info("no routing on the All tasks tab: %s", exc)
            return
        row = rows[route.task.ref.partition("@")[0]]
        row[4] = f"router's choice ({route.confidence:.1%} sure)" + (f"; {row[4]}" if row[4] else "")
        for ref in route.left_out:
            left = rows[ref.partition("@")[0]]
            left[4] = "not routed to: no routing statistics" + (f"; {left[4]}" if left[4] else "")

    # -- Compare -----------------------------------------------------------------------------------------------

    @user_errors
    def compare(self) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """The cost table of ``adaptkit compare``, its summary and the data of its four charts."""
        report = compare(self.registry)
        return (tables.summary(report), tables.cost_table(report),
                tables.per_task(report, "trainable_params", "parameters (K)", 1e3),
                tables.per_task(report, "bytes", "KB on disk", 1e3), tables.storage(report),
                tables.accuracy(report))

    @user_errors
    def continual(self, limit: float | None = 200) -> tuple[str, pd.DataFrame]:
        """``adaptkit continual``: accuracy with no task name after each task is added, and its summary."""
        from adaptkit.inference import evaluate_continual

        limit = inputs.whole("Test images per task", limit, 1, 1_000_000, default=None, empty_below=1)
        r = evaluate_continual(registry=self.registry, limit=limit, device=self.device)
        rows = [[f"{k + 1}. {ref}", *(round(100 * v[k], 1) for v in (r.task_id, r.cil, r.til, r.simplecil))]
                for k, ref in enumerate(r.tasks)]
        table = pd.DataFrame(rows, columns=["after adding", "task-id %", "no task given %", "task given %",
                                            "SimpleCIL %"])
        return (f"**{len(r.tasks)} tasks** in the order they were added, {sum(r.images)} test images: average "
                f"incremental accuracy **{r.average_incremental:.1%}**, final **{r.final:.1%}** with no task name "
                f"(task given: {r.til[-1]:.1%}), forgetting {100 * r.forgetting:.1f} points."), table

    # -- Add a task --------------------------------------------------------------------------------------------

    @user_errors
    def train(self, dataset: str, folder: str, task: str, method: str, epochs: float, batch_size: float,
              lr: float | None, rank: float | None, backbone: str, pretrained: bool, limit_train: float | None,
              limit_eval: float | None, image_size: float | None = None,
              progress: gr.Progress = gr.Progress()) -> tuple[str, dict, dict]:
        """Train a task, register it, and return a status line with the refreshed picker."""
        spec, arguments = training.train_arguments(dataset, folder, task, method, epochs, batch_size, lr, rank,
                                                   backbone, pretrained, limit_train, limit_eval, self.data_roots,
                                                   image_size)
        progress(0, desc="Building the backbone and loading the data")
        result = train(spec, **arguments, registry=self.registry, on_event=training.progress_reporter(progress))
        v = result.version
        tasks = self._sync(force=True)
        status = (f"Trained **{v.task.name}** version {v.version}: {v.method} on "
                  f"{sized_name(v.backbone.name, v.backbone.data_config)}, "
                  f"{v.trainable_params:,} trainable parameters, {format_bytes(v.bytes)} on disk, test top-1 "
                  f"{format_percent(result.metrics.get('test_top1'))}. It is in the task picker now.")
        picker, note = self._picker(v.task.name, tasks)
        return status, picker, note


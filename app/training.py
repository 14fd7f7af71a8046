"""The page's **Add a task** tab: its choices (data sets, methods, which take a rank) taken from the library, and its
inputs turned into a :func:`~adaptkit.training.train` call (the data set spec, the recipe, a progress bar)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from adaptkit.backbone import BackboneSpec
from adaptkit.checks import MAX_RANK
from adaptkit.data import BUILTIN, builtin_name, default_data_dir, list_datasets
from adaptkit.data.roots import folder_in_roots
from adaptkit.methods import METHODS
from adaptkit.settings import bounds_of
from adaptkit.training import TrainConfig, TrainEvent
from adaptkit_app import inputs

__all__ = ["METHOD_CHOICES", "RANKED_METHODS", "dataset_choices", "default_data_roots", "dataset_spec",
           "train_arguments", "progress_reporter"]

METHOD_CHOICES = list(METHODS)
RANKED_METHODS = tuple(n for n, m in METHODS.items() if "rank" in {f.name for f in dataclasses.fields(m.config_class)})


def dataset_choices() -> list[tuple[str, str]]:
    """The page's list: built-in sets and ``folder`` (Hugging Face sets are typed, as ``hf-disk:PATH``)."""
    return [(f"{d.name} — {d.description}", d.name) for d in list_datasets() if d.kind != "huggingface"]


def default_data_roots() -> list[Path]:
    """The folders the page trains from when ``--data-root`` is not given: adaptkit's data folder, if it exists."""
    return [p for p in [default_data_dir()] if p.is_dir()]


def train_arguments(dataset: str, folder: str, task: str, method: str, epochs: float, batch_size: float,
                    lr: float | None, rank: float | None, backbone: str, pretrained: bool, limit_train: float | None,
                    limit_eval: float | None, data_roots: Sequence[Path],
                    image_size: float | None = None) -> tuple[str, dict[str, Any]]:
    """The tab's fields as ``train``'s data set spec and keyword arguments (every field checked, in its own words).

    Raises:
        PageInputError: a field out of its range; gr.Error: a data set the page cannot train on;
        BackboneError: an image size the backbone cannot take (the library's check, as ``--image-size``'s).
    """
    spec = dataset_spec(inputs.text("Data set", dataset), inputs.text("Folder", folder), data_roots)
    method = inputs.text("Method", method) or "adapter"
    if method not in METHOD_CHOICES:
        raise inputs.PageInputError(f"Method must be one of {', '.join(METHOD_CHOICES)}, got {method[:40]!r}.")
    config = TrainConfig(epochs=inputs.whole("Epochs", epochs, *bounds_of(TrainConfig, "epochs"), default=1),
                         batch_size=inputs.whole("Batch size", batch_size, *bounds_of(TrainConfig, "batch_size"),
                                                 default=TrainConfig.batch_size),
                         lr=inputs.number("Learning rate", lr, 0, 10) or None,  # 0: the method's default
                         limit_train=inputs.whole("Training images", limit_train, 1, 10**9, empty_below=1),
                         limit_eval=inputs.whole("Validation and test images", limit_eval, 1, 10**9, empty_below=1))
    rank = inputs.whole("Rank", rank, 1, MAX_RANK, empty_below=1) if method in RANKED_METHODS else None
    name, backbone = inputs.text("Task name", task, max_len=200), inputs.text("Backbone", backbone, max_len=200)
    pretrained = inputs.flag("Pretrained weights", pretrained)
    size = inputs.integer("Image size", image_size) or None  # 0: the backbone's own
    backbone = BackboneSpec(backbone, pretrained=pretrained, image_size=size)  # checks the size as the CLI does
    return spec, {"task": name or None, "backbone": backbone, "method": method,
                  "method_config": {"rank": rank} if rank else None, "config": config,
                  "data_roots": list(data_roots)}  # every file the data set names is checked against them too


def dataset_spec(dataset: str | None, folder: str | None, data_roots: Sequence[Path]) -> str:
    """The data set spec for what the tab was given; a folder or a saved set must lie inside ``data_roots``."""
    dataset, folder = (dataset or "").strip(), (folder or "").strip()
    if dataset.lower().startswith("folder:"):  # typed into the data set box: the same roots apply
        dataset, folder = "folder", dataset[len("folder:"):].strip()
    if dataset == "folder":
        if not folder:
            raise gr.Error("Enter the folder's path (one sub-folder of images per class, or train/ and test/).",
                           print_exception=False)
        return f"folder:{folder_in_roots(folder, data_roots)}"
    if not dataset:
        raise gr.Error("Pick a data set.", print_exception=False)
    if name := builtin_name(dataset):  # a name from the list is that set, never a folder where the page runs
        return f"{BUILTIN}{name}"
    kind, _, path = dataset.partition(":")
    if kind.strip().lower() in ("hf-disk", "hf-files"):  # a path on the server: the folder's roots apply
        if not path.strip():
            raise gr.Error(f"Enter the path after {kind.strip()}: (a data set saved inside the data roots).",
                           print_exception=False)
        where = folder_in_roots(path, data_roots, files=kind.strip().lower() == "hf-files")
        return f"{kind.strip().lower()}:{where}"
    if kind.strip().lower() == "hf":
        raise gr.Error("This page does not download from the Hugging Face hub: train hub data sets from the "
                       "command line (adaptkit train --dataset hf:NAME), or save one inside the data roots and "
                       "enter hf-disk:PATH.", print_exception=False)
    raise gr.Error(f"{dataset[:80]!r} is not a data set adaptkit knows: pick one from the list, pick folder and "
                   "enter the path of your images, or enter hf-disk:PATH or hf-files:PATH.",
                   print_exception=False)


def progress_reporter(progress: gr.Progress) -> Callable[[TrainEvent], None]:
    """A ``train`` callback that moves the page's progress bar: the epoch, its loss and accuracy."""
    def report(ev: TrainEvent) -> None:
        done = (ev.epoch - 1 + ev.step / max(ev.steps, 1)) / max(ev.epochs, 1)
        if ev.phase == "train":
            desc = f"Epoch {ev.epoch}/{ev.epochs}: training, loss {ev.loss:.3f}, accuracy {ev.accuracy:.1%}"
        elif ev.phase == "val":
            desc, done = f"Epoch {ev.epoch}/{ev.epochs}: validating", ev.epoch / max(ev.epochs, 1)
        else:
            desc, done = {"test": "Testing the best epoch", "save": "Saving to the registry"}[ev.phase], 1.0
        progress(min(done, 1.0), desc=desc)

    return report

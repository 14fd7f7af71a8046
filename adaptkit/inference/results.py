"""What a :class:`~adaptkit.inference.Predictor` holds and hands back: a registered version attached to its resident
backbone (:class:`LoadedTask`), a batch's frozen prefix, and the answers: :class:`Prediction`, :class:`RoutedPrediction`
and :class:`Route`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from adaptkit.artifacts import AdapterMeta
from adaptkit.backbone import Backbone
from adaptkit.errors import step
from adaptkit.inference.routing_stats import RoutingStats
from adaptkit.methods import TaskModel

__all__ = ["Prediction", "RoutedPrediction", "Route", "LoadedTask", "FrozenPrefix", "ImageLike", "left_out_note"]

ImageLike = Image.Image | str | Path | torch.Tensor | np.ndarray


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    prob: float


@dataclass(frozen=True)
class RoutedPrediction:
    """An image's answer with no task given: the task the router chose, how sure it was, and the labels.

    ``task`` is the most probable task the image fits (it is at least as typical of it as the rejection rate of
    the task's own images). ``rejected``: the image fits none of the tasks (``task`` and ``predictions`` are then
    the most probable, nearest, task's).
    """

    task: str  # task@N: the most probable task that fits the image; when rejected, the nearest task
    confidence: float  # the routing posterior of ``task``
    runner_up: str | None  # the most likely other task (None when only one task was asked)
    runner_up_confidence: float
    predictions: list[Prediction]
    rejected: bool = False  # no task fits the image (never with accept_all, or for versions without percentiles)
    fit: float | None = None  # share of ``task``'s own images less typical than this one; None: not calibrated
    left_out: tuple[str, ...] = ()  # candidate versions not routed over: their files have no routing statistics

    @property
    def passed_over(self) -> str | None:
        """The task the router found likelier than ``task`` but that the image does not fit (so ``task`` got it),
        or None when ``task`` is the most probable."""
        if self.rejected or self.runner_up is None or self.runner_up_confidence <= self.confidence:
            return None
        return self.runner_up


def left_out_note(refs: tuple[str, ...] | list[str]) -> str:
    """What routed prediction says of the versions it left out (:attr:`RoutedPrediction.left_out`), with the step
    that adds them (:func:`adaptkit.errors.step`: render it with :func:`adaptkit.errors.render` and a front end's
    words)."""
    names = " ".join(sorted({r.partition("@")[0] for r in refs}))
    return (f"routed over the other tasks; left out {', '.join(refs)}: no routing statistics (trained before routing "
            f"existed, or imported): run {step('routing_fit', names)} to route to {'it' if len(refs) == 1 else 'them'}"
            " too")


@dataclass
class Route:
    """Where the router sends one image."""

    task: LoadedTask
    confidence: float
    runner_up: LoadedTask | None
    runner_up_confidence: float
    fit: float | None = None  # share of the task's own images less typical than this one (None: not calibrated)
    rejected: bool = False  # every candidate's fit below the rejection rate: the image belongs to none
    left_out: tuple[str, ...] = ()  # candidate versions not routed over (no routing statistics): task@N


@dataclass
class LoadedTask:
    """A registered version attached to a resident backbone."""

    ref: str
    meta: AdapterMeta
    model: TaskModel
    host: _Host
    routing: RoutingStats | None = None  # what routing needs of this version, if its file has it
    attached: bool = True  # False once unloaded: its modules are off the backbone

    @property
    def classes(self) -> list[str]:
        return self.meta.classes


@dataclass(frozen=True)
class FrozenPrefix:
    """The bare backbone's tokens at block ``start`` of a batch: where the tasks' own pass can begin, since none of
    the tasks it was computed for changes anything before that block (the pooled features when ``start`` is the
    depth: a linear probe's head reads them directly)."""

    trunk: torch.nn.Module
    start: int
    tokens: torch.Tensor


@dataclass
class _Host:
    """One resident backbone, its eval transform and the tasks attached to it."""

    backbone: Backbone
    transform: Any
    tasks: dict[str, LoadedTask] = field(default_factory=dict)  # by adapter file sha256

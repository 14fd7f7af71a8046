""":func:`fit`: train a task model that is attached to its backbone, in memory, with no I/O (no registry, no files,
no trackers), the way Lightning's ``fit`` is apart from its checkpoint callback; :func:`~adaptkit.training.train`
composes it with the data, the backbone and the registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from adaptkit.errors import ConfigError
from adaptkit.methods import TaskModel
from adaptkit.training import feature_cache
from adaptkit.training.checkpointing import activation_checkpointing
from adaptkit.training.checks import fit_batch
from adaptkit.training.config import TrainConfig, TrainEvent
from adaptkit.training.loop import _autocast, _fit, _loader, _search_lr, _workers, data_parallel, run_eval
from adaptkit.training.lr_search import LrSearch

__all__ = ["FitResult", "fit"]


@dataclass
class FitResult:
    """What :func:`fit` measured; the model itself comes back trained, holding its best epoch."""

    metrics: dict[str, Any]  # val_top1, best_epoch, test_top1, test_top5, test_loss, test_images
    history: list[dict[str, Any]]  # one entry per epoch
    timing: dict[str, Any]  # train_time_s, images_per_s, peak_memory_mb, device
    config: TrainConfig  # the recipe as it ran (lr chosen by the search when lr="auto")
    search: LrSearch | None = None  # the trials of lr="auto"
    features: Any = None  # the data as trained on: cached frozen features where the feature cache ran
    net: nn.Module | None = field(default=None, repr=False)  # what maps a batch of ``features`` to logits


def fit(model: TaskModel, data: Any, config: TrainConfig, *, device: torch.device, world: int = 1,
        on_event: Callable[[TrainEvent], None] | None = None) -> FitResult:
    """Train ``model`` on ``data`` (its ``train``/``val``/``test`` splits) with the recipe ``config`` (the method's
    defaults fill what it leaves None, see :meth:`TrainConfig.resolved`; the batch is capped at the training images):
    the frozen blocks' features cached once when nothing augments them, a learning-rate sweep first when
    ``lr="auto"``, then the epochs, keeping the best validation epoch, whose state is loaded back before the test
    split is evaluated.

    Args:
        model: a task model attached to its backbone (:meth:`Method.attach`).
        data: the task's data (:func:`adaptkit.data.load_task_data`).
        config: the recipe.

    Raises:
        ConfigError: ``model`` is not an attached task model or ``config`` not a TrainConfig.
        device: where to train; the model is on it already.
        world: the data-parallel world size (under ``torchrun``), 1 otherwise.
        on_event: called with a :class:`TrainEvent` after every step and evaluation.
    """
    if not isinstance(model, TaskModel):
        raise ConfigError(f"model must be a task model attached to its backbone (Method.attach), got "
                          f"{type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    cfg = config.resolved(model.method.name)  # the method's default rate and weight decay where None
    cfg = fit_batch(cfg, len(data.train))
    started = time.perf_counter()
    feats, net = feature_cache.prepare(model, data, batch_size=cfg.batch_size * 2, workers=_workers(cfg),
                                      device=device, autocast=lambda: _autocast(device, cfg.precision),
                                      enabled=cfg.feature_cache and not data_parallel(world))
    with activation_checkpointing(model.trunk, cfg.checkpointing):
        search = _search_lr(model, feats, cfg, model.method.name, device, world, on_event, net) \
            if cfg.lr == "auto" else None
        cfg = replace(cfg, lr=search.chosen) if search else cfg
        best, history, timing = _fit(model, feats, cfg, device, world, on_event, net)
    timing["train_time_s"] = time.perf_counter() - started  # the cached pass and the search count as training
    model.load_state(best["state"])
    emit = on_event or (lambda e: None)
    test = run_eval(net, _loader(feats.test, cfg.batch_size * 2, False, cfg, 1, device), device,
                    lambda s, n: emit(TrainEvent("test", cfg.epochs, cfg.epochs, s, n)), cfg.precision)
    metrics = {"val_top1": best["val_top1"], "best_epoch": best["epoch"], "test_top1": test["top1"],
               "test_top5": test["top5"], "test_loss": test["loss"], "test_images": test["images"]}
    return FitResult(metrics=metrics, history=history, timing=timing, config=cfg, search=search, features=feats,
                     net=net)

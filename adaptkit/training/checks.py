"""Checks around training (the recipe's own values are checked by :class:`~adaptkit.training.TrainConfig`): the
arguments of ``train``, the batch against the data, and divergence (a non-finite loss or parameter stops
training before anything is saved)."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch

from adaptkit.data import BUILTIN, builtin_name
from adaptkit.errors import ConfigError, DatasetError, DivergedError, param

__all__ = ["check_train_args", "fit_batch", "DivergenceGuard"]

_log = logging.getLogger("adaptkit.training")


def check_train_args(dataset: Any, task: Any, config: Any, config_class: type, *, pretrained: Any = True,
                     classes: Any = None, init_from: Any = None) -> None:
    """The arguments of ``train`` that are not part of the recipe: types a caller can get wrong."""
    if not isinstance(pretrained, bool):  # bool("false") is True: a string would fetch hub weights by mistake
        raise ConfigError(f"pretrained must be True or False, got {pretrained!r}")
    if classes is not None and not (isinstance(classes, str) or (isinstance(classes, (list, tuple)) and
                                                                 all(isinstance(c, str) for c in classes))):
        raise ConfigError(f"classes must be a string such as '0-4' or 'cat,dog', or a list of class names, got "
                          f"{classes!r}")
    if init_from is not None and (not isinstance(init_from, str) or not init_from.strip()):
        raise ConfigError(f"init_from must be TASK, TASK@N or 'auto', got {init_from!r}")
    if not isinstance(dataset, str) or not dataset.strip():
        raise ConfigError(f"dataset must be a spec such as digits, cifar10 or folder:PATH, got {dataset!r}")
    if not dataset.startswith(("folder:", BUILTIN)) and builtin_name(dataset) is None and \
            Path(dataset).expanduser().is_dir():
        raise DatasetError(f"{dataset} is a folder: write folder:{dataset} to train on its class folders")
    if dataset.startswith("folder:") and not dataset[len("folder:"):].strip():
        raise DatasetError("folder: needs the path of a folder of class folders, e.g. folder:~/data/pets")
    if task is not None and (not isinstance(task, str) or not task.strip()):
        raise ConfigError(f"task must be a name (letters, digits, '_', '-', '.') or None, got {task!r}")
    if config is not None and not isinstance(config, config_class):
        raise ConfigError(f"config must be a {config_class.__name__}, got {type(config).__name__}")


def fit_batch(cfg: Any, train_images: int) -> Any:
    """``cfg`` with its batch size capped at the number of training images (with a warning), else as it is."""
    if cfg.batch_size <= train_images:
        return cfg
    _log.warning("batch size %d is larger than the %d training images: using batch size %d", cfg.batch_size,
                 train_images, train_images)
    return dataclasses.replace(cfg, batch_size=train_images)


class DivergenceGuard:
    """Stops training at a non-finite loss or parameter, or a loss that has run away.

    A loss more than :attr:`RUNAWAY` times the first step's is taken as divergence too: a huge learning rate with
    gradient clipping keeps the numbers finite but the model useless (the loss of a fresh head is about ln C).
    """

    RUNAWAY = 100.0

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.first: float | None = None

    def loss(self, value: float, epoch: int, step: int) -> float:
        """``value`` if training has not diverged; else a :class:`DivergedError`."""
        if not math.isfinite(value):
            self._stop(epoch, step, f"the loss is {value}")
        if self.first is None:
            self.first = max(value, 1.0)
        elif value > self.RUNAWAY * self.first:
            self._stop(epoch, step, f"the loss ran away to {value:.3g} from {self.first:.3g} at the first step")
        return value

    def params(self, state: dict[str, torch.Tensor], epoch: int, step: int) -> None:
        """Raise a :class:`DivergedError` if any trained tensor holds a NaN or an infinity."""
        bad = next((k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if bad is not None:
            self._stop(epoch, step, f"parameter {bad} is not finite")

    def _stop(self, epoch: int, step: int, what: str) -> None:
        raise DivergedError(f"training diverged at epoch {epoch}, step {step}: {what}. Nothing was saved: lower the "
                            f"learning rate (it was {self.cfg.lr:g}) or check the method's settings "
                            f"({param('scale')}, {param('alpha')})")

"""Checks around training: the recipe's values (before anything slow), the batch against the data, and
divergence (a non-finite loss or parameter stops training before anything is saved)."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch

from adaptkit.checks import MAX_BATCH, MAX_EPOCHS, check_choice, check_float, check_int
from adaptkit.data import BUILTIN, builtin_name
from adaptkit.devices import resolve_device
from adaptkit.errors import ConfigError, DatasetError, DivergedError, param

__all__ = ["check_config", "check_train_args", "fit_batch", "DivergenceGuard"]

_log = logging.getLogger("adaptkit.training")
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit


def check_config(cfg: Any) -> None:
    """Every numeric setting of a ``TrainConfig`` finite and in range, the device a device's name.

    Raises:
        ConfigError: naming the first bad setting, its value and its range.
    """
    check_int("epochs", cfg.epochs, 1, MAX_EPOCHS)
    check_int("batch_size", cfg.batch_size, 1, MAX_BATCH)
    if isinstance(cfg.lr, str) and cfg.lr != "auto":
        raise ConfigError(f"lr must be a number greater than 0, 'auto' or None, got {cfg.lr!r}")
    if cfg.lr != "auto":
        check_float("lr", cfg.lr, 0, low_open=True, optional=True)
    check_int("threads", getattr(cfg, "threads", None), 1, 1024, optional=True)
    check_float("weight_decay", cfg.weight_decay, 0, optional=True)
    check_float("warmup_epochs", cfg.warmup_epochs, 0, MAX_EPOCHS)
    check_float("min_lr_ratio", cfg.min_lr_ratio, 0, 1)
    check_float("label_smoothing", cfg.label_smoothing, 0, 1, high_open=True)
    check_float("grad_clip", cfg.grad_clip, 0, low_open=True, optional=True)
    check_int("seed", cfg.seed, 0, MAX_SEED)
    check_choice("precision", cfg.precision, ("auto", "bf16", "fp32"))
    check_int("num_workers", cfg.num_workers, 0, optional=True)
    check_float("val_fraction", cfg.val_fraction, 0, 1, high_open=True)
    check_int("limit_train", cfg.limit_train, 1, optional=True)
    check_int("limit_eval", cfg.limit_eval, 1, optional=True)
    if cfg.crop_scale is not None:
        low, high = _pair("crop_scale", cfg.crop_scale)
        check_float("crop_scale[1]", high, 0, 1, low_open=True)
        check_float("crop_scale[0]", low, 0, high, low_open=True)
    if cfg.device is not None:
        resolve_device(cfg.device, check_available=False)


def _pair(name: str, value: Any) -> tuple[Any, Any]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(f"{name} must be a pair (low, high), got {value!r}")
    return value[0], value[1]


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

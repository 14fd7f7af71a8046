"""Training a task: the recipe (``config``), the loop (``loop``), ``train()`` composing them (``pipeline``), and
lr search, the feature cache, warm starts, divergence checks, activation checkpointing and experiment trackers.

The public names are imported on first use (PEP 562), so that ``adaptkit.training.recipe`` (which the command line
imports) costs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "METHOD_DEFAULTS": "config", "TrainConfig": "config", "TrainEvent": "config", "TrainResult": "config",
    "scaled_lr": "config", "lr_factor": "loop", "run_eval": "loop", "seed_everything": "loop",
    "evaluate": "pipeline", "train": "pipeline",
}
__all__ = ["METHOD_DEFAULTS", "TrainConfig", "TrainEvent", "TrainResult", "evaluate", "lr_factor", "run_eval",
           "scaled_lr", "seed_everything", "train"]

if TYPE_CHECKING:
    from adaptkit.training.config import METHOD_DEFAULTS, TrainConfig, TrainEvent, TrainResult, scaled_lr
    from adaptkit.training.loop import lr_factor, run_eval, seed_everything
    from adaptkit.training.pipeline import evaluate, train


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'adaptkit.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"adaptkit.training.{_WHERE[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])

"""Training a task: the recipe (``config``), the loop (``loop``), ``fit()`` in memory with no I/O (``fitting``),
``train()`` composing it with the data, the backbone and the registry (``pipeline``); and lr search, the feature
cache, warm starts, divergence checks, activation checkpointing and experiment trackers.

The public names are imported on first use (PEP 562), so that ``adaptkit.training.recipe`` (which the command line
imports) costs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adaptkit.lazy import lazy_names

_WHERE = {
    "METHOD_DEFAULTS": "config", "TrainConfig": "config", "TrainEvent": "config", "TrainResult": "config",
    "scaled_lr": "config", "lr_factor": "loop", "run_eval": "loop", "seed_everything": "loop",
    "evaluate": "pipeline", "train": "pipeline", "fit": "fitting", "FitResult": "fitting",
}
__all__ = ["METHOD_DEFAULTS", "FitResult", "TrainConfig", "TrainEvent", "TrainResult", "evaluate", "fit", "lr_factor",
           "run_eval", "scaled_lr", "seed_everything", "train"]

if TYPE_CHECKING:
    from adaptkit.training.config import METHOD_DEFAULTS, TrainConfig, TrainEvent, TrainResult, scaled_lr
    from adaptkit.training.fitting import FitResult, fit
    from adaptkit.training.loop import lr_factor, run_eval, seed_everything
    from adaptkit.training.pipeline import evaluate, train


__getattr__, __dir__ = lazy_names(__name__, {name: f"{__name__}.{module}" for name, module in _WHERE.items()})

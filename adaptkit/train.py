"""``from adaptkit.train import train, TrainConfig``, as the README shows it, kept working: the code is in
:mod:`adaptkit.training` (the recipe in ``config``, the loop in ``loop``, :func:`train` in ``pipeline``)."""

from adaptkit.training.config import METHOD_DEFAULTS, TrainConfig, TrainEvent, TrainResult, scaled_lr
from adaptkit.training.loop import lr_factor, run_eval, seed_everything
from adaptkit.training.pipeline import evaluate, train

__all__ = ["TrainConfig", "TrainEvent", "TrainResult", "METHOD_DEFAULTS", "train", "evaluate", "seed_everything",
           "lr_factor", "run_eval", "scaled_lr"]

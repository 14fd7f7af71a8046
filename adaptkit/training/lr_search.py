"""``lr="auto"``: a short, seeded learning-rate sweep on the validation split.

Each candidate trains the same freshly initialised task for a fraction of the epochs on (at most) a subset of the
training images, and is scored by its best validation top-1; the best candidate wins, and a tie goes to the one
closest to the method's default. Short runs favour large learning rates a little (their cosine decays sooner), so
the grid stays within a factor of 4 of the default, where the full-length run was measured to be close to its best
(see the README's recipe table).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["LR_FACTORS", "LrSearch", "LrTrial", "lr_candidates", "search_budget", "search_lr"]

LR_FACTORS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
SEARCH_EPOCH_SHARE = 0.3  # each trial runs this share of the epochs (at least one)
SEARCH_MAX_IMAGES = 2000  # and sees at most this many training images per epoch


@dataclass
class LrTrial:
    lr: float
    val_top1: float


@dataclass
class LrSearch:
    """What the sweep tried and what it chose; recorded with the version's recipe."""

    chosen: float
    default: float
    epochs: int
    images: int
    trials: list[LrTrial] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"chosen": self.chosen, "default": self.default, "epochs": self.epochs, "images": self.images,
                "trials": [{"lr": t.lr, "val_top1": t.val_top1} for t in self.trials]}


def lr_candidates(default: float, factors: Sequence[float] = LR_FACTORS) -> list[float]:
    """The learning rates to try: ``default`` times each factor, in increasing order."""
    return sorted(default * f for f in factors)


def search_budget(epochs: int, train_images: int) -> tuple[int, int]:
    """(epochs, training images) of one trial for a run of ``epochs`` over ``train_images`` images."""
    return max(1, round(epochs * SEARCH_EPOCH_SHARE)), min(train_images, SEARCH_MAX_IMAGES)


def search_lr(trial: Callable[[int, float], float], default: float, epochs: int, images: int,
              factors: Sequence[float] = LR_FACTORS) -> LrSearch:
    """Run ``trial(index, lr) -> validation top-1`` for every candidate and pick the best.

    Args:
        trial: trains from the same initial state with learning rate ``lr`` and returns its best validation top-1.
        default: the method's default learning rate; the grid is centred on it, and it wins ties.
        epochs, images: the budget each trial runs with (recorded, see :func:`search_budget`).
        factors: multiples of ``default`` to try.

    Returns:
        The search: the chosen learning rate and every trial in the order it ran.
    """
    trials = [LrTrial(lr, trial(i, lr)) for i, lr in enumerate(lr_candidates(default, factors))]
    best = max(trials, key=lambda t: (round(t.val_top1, 6), -abs(math.log(t.lr / default))))
    return LrSearch(chosen=best.lr, default=default, epochs=epochs, images=images, trials=trials)

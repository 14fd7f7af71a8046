"""Training progress: a rich bar in a terminal; one plain line per epoch in a log file, CI or under nohup."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["PlainProgress", "RichProgress", "train_progress"]


def _chosen_lr(e: Any) -> str:
    """The line for the ``lr`` event of ``--lr auto``."""
    return f"--lr auto chose {e.lr:.2g} (validation top-1 {100 * e.accuracy:.1f}%)"


def _stats(e: Any) -> list[str]:
    stats = []
    if e.loss is not None:
        stats.append(f"loss {e.loss:.3f}")
    if e.accuracy is not None:
        stats.append(f"acc {100 * e.accuracy:.1f}%")
    if e.images_per_s:
        stats.append(f"{e.images_per_s:.0f} img/s")
    return stats


class RichProgress:
    """Feeds the library's TrainEvents into a rich progress bar."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.bar = progress.add_task("starting", total=None, stats="")

    def __call__(self, e: Any) -> None:
        if e.phase == "lr":
            self.progress.console.print(_chosen_lr(e), markup=False, highlight=False)
            return
        label = {"search": f"lr {getattr(e, 'lr', 0) or 0:.2g} {e.epoch}/{e.epochs}",
                 "train": f"epoch {e.epoch}/{e.epochs}", "val": f"validate {e.epoch}/{e.epochs}",
                 "test": "test", "save": "saving"}.get(e.phase, e.phase)
        self.progress.update(self.bar, description=label, completed=e.step, total=e.steps, stats="  ".join(_stats(e)))


class PlainProgress:
    """One line per epoch (train loss and accuracy, validation accuracy, images/s, seconds) for logs."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.last_train: Any = None
        self.since = time.monotonic()

    def __call__(self, e: Any) -> None:
        if e.phase == "lr":
            self.console.print(_chosen_lr(e), markup=False, highlight=False, soft_wrap=True)
        elif e.phase == "train":
            self.last_train = e
        elif e.phase == "val" and e.step == e.steps and e.accuracy is not None:
            t = self.last_train
            parts = [f"epoch {e.epoch}/{e.epochs}"]
            if t is not None:
                parts += [f"loss {t.loss:.3f}", f"train acc {100 * t.accuracy:.1f}%"]
            parts.append(f"val acc {100 * e.accuracy:.1f}%")
            if t is not None and t.images_per_s:
                parts.append(f"{t.images_per_s:.0f} img/s")
            seconds = time.monotonic() - self.since
            parts.append(f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s")
            self.since = time.monotonic()
            self.console.print("  ".join(parts), markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def train_progress(err: Console, plain: bool) -> Iterator[Callable[[Any], None]]:
    """The callback for ``train(on_event=...)``: plain lines on ``err`` if ``plain``, else a transient bar."""
    if plain:
        yield PlainProgress(err)
        return
    columns = [TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        yield RichProgress(progress)

"""Checks of settings, shared by the config dataclasses and the public functions: each raises a
:class:`~adaptkit.errors.ConfigError` that names the setting, the bad value and the range it must lie in."""

from __future__ import annotations

import math
import numbers
from typing import Any

from adaptkit.errors import ConfigError

__all__ = ["MAX_RANK", "MAX_EPOCHS", "MAX_BATCH", "MAX_SEED", "MAX_WORKERS", "check_int", "check_float", "check_choice"]

MAX_RANK = 4096  # wider than any ViT in timm: a larger adapter or LoRA rank is a typo, refused before anything is built
MAX_EPOCHS = 10_000  # more passes than any adapter recipe needs: a larger count is a typo that would train for weeks
MAX_BATCH = 65_536  # images per step: beyond any accelerator's memory for a ViT
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_WORKERS = 64  # data loader processes: more only waits on the disk and may exhaust memory or process limits


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'greater than' if low_open else 'at least'} {_num(low)}"
    return f"{'less than' if high_open else 'at most'} {_num(high)}" if high is not None else ""


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None,
              optional: bool = False) -> int | None:
    """``value`` as a whole number in ``[low, high]`` (None passes when ``optional``).

    Raises:
        ConfigError: a bool, a float such as 1.5, a string, or a number out of range.
    """
    if value is None and optional:
        return None
    ok_type = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok_type or (low is not None and value < low) or (high is not None and value > high):
        where = _range_text(low, high, False, False)
        raise ConfigError(f"{name} must be a whole number{' ' + where if where else ''}"
                          f"{' or None' if optional else ''}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, optional: bool = False) -> float | None:
    """``value`` as a finite number in the given range (None passes when ``optional``).

    Raises:
        ConfigError: not a number, NaN or infinite, or out of range.
    """
    if value is None and optional:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = not ((low is not None and (value <= low if low_open else value < low))
                  or (high is not None and (value >= high if high_open else value > high)))
    if not ok:
        where = _range_text(low, high, low_open, high_open)
        raise ConfigError(f"{name} must be a finite number{' ' + where if where else ''}"
                          f"{' or None' if optional else ''}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; else a ConfigError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value

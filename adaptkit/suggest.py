""""Did you mean ...?" for names a user types: tasks, backbones, methods, data sets."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["closest", "did_you_mean"]


def closest(name: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The choices most like ``name``, best first, compared without regard to case.

    Args:
        name: what the user typed.
        choices: the names that exist.
        n: at most this many.
        cutoff: similarity (0-1, difflib's ratio) below which a choice is not offered.

    Returns:
        The matching choices as they are spelt in ``choices``.
    """
    by_key: dict[str, str] = {}
    for choice in choices:
        by_key.setdefault(choice.lower(), choice)
    found = difflib.get_close_matches(str(name).lower(), list(by_key), n=n, cutoff=cutoff)
    return [by_key[k] for k in found]


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """``"did you mean 'digits'?"`` (or ``'a' or 'b'``), or an empty string when nothing is close."""
    found = closest(name, choices, n=n)
    if not found:
        return ""
    quoted = [repr(f) for f in found]
    return "did you mean " + (quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?"

"""The page's inputs as the handlers need them, checked: a field's value from the browser (or from anyone calling the
page's API directly) can be any JSON value, so each is coerced here or refused with a message that names the field
as the page labels it, never a Python parameter.

Each function raises :class:`PageInputError` (a ``gr.Error`` that stays until dismissed).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import gradio as gr

__all__ = ["PageInputError", "integer", "whole", "number", "text", "flag", "upload", "MAX_TEXT"]

MAX_TEXT = 4096  # characters in a text field: a path, a task or backbone name is far shorter


class PageInputError(gr.Error):
    """A field's value the page cannot use; its message names the field."""

    def __init__(self, message: str) -> None:
        super().__init__(message, duration=None, print_exception=False)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_number(field: str, value: Any) -> float | None:
    """A number from a number box (an int, a float or a numeric string); None for an empty box."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise PageInputError(f"{field} must be a number, got {_shown(value)}.")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise PageInputError(f"{field} must be a number, got {_shown(value)}.") from None
    if not math.isfinite(number):
        raise PageInputError(f"{field} must be a finite number, got {_shown(value)}.")
    return number


def integer(field: str, value: Any) -> int | None:
    """A whole number whose range the library checks (its message then names the field); an empty box gives None.

    Raises:
        PageInputError: not a number, or not whole (2.5).
    """
    number = _as_number(field, value)
    if number is not None and number != int(number):
        raise PageInputError(f"{field} must be a whole number, got {_shown(value)}.")
    return None if number is None else int(number)


def whole(field: str, value: Any, low: int, high: int, *, default: int | None = None,
          empty_below: int | None = None) -> int | None:
    """A whole number in ``[low, high]``; an empty box (or a value below ``empty_below``, e.g. 0 for "no limit")
    gives ``default``.

    Raises:
        PageInputError: not a number, not whole (2.5), or out of range.
    """
    number = _as_number(field, value)
    if number is None or (empty_below is not None and number < empty_below):
        return default
    number = integer(field, number)
    if not low <= number <= high:
        raise PageInputError(f"{field} must be from {low:,} to {high:,}, got {_shown(value)}.")
    return int(number)


def number(field: str, value: Any, low: float, high: float, *, low_open: bool = False,
           default: float | None = None) -> float | None:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``); an empty box gives ``default``."""
    got = _as_number(field, value)
    if got is None:
        return default
    if got > high or got < low or (low_open and got == low):
        raise PageInputError(f"{field} must be {'above' if low_open else 'at least'} {low:g} and at most {high:g}, "
                             f"got {_shown(value)}.")
    return got


def text(field: str, value: Any, *, max_len: int = MAX_TEXT) -> str:
    """A text box's value, stripped; None gives ''."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PageInputError(f"{field} must be text, got {_shown(value)}.")
    if len(value) > max_len:
        raise PageInputError(f"{field} is {len(value):,} characters long: at most {max_len:,}.")
    if "\x00" in value:
        raise PageInputError(f"{field} holds a NUL character: type it again.")
    return value.strip()


_YES, _NO = ("true", "yes", "1", "on"), ("false", "no", "0", "off", "")


def flag(field: str, value: Any) -> bool:
    """A tick box: a bool, or true/false, yes/no, 1/0 from an API caller."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _YES + _NO:
        return value.strip().lower() in _YES
    raise PageInputError(f"{field} must be ticked or not (true or false), got {_shown(value)}.")


def upload(value: Any) -> str | None:
    """An image field's value: the uploaded file's path on the server, or None for no image."""
    if value is None:
        return None
    if isinstance(value, dict) and isinstance(value.get("path"), str):  # gradio's FileData, if it arrives as such
        value = value["path"]
    if not isinstance(value, str) or not value.strip():
        raise PageInputError(f"The image must be an uploaded image file, got {_shown(value)}.")
    return value

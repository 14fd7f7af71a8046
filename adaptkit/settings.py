"""Settings declared once: a config dataclass's field carries its default, its help and its check, and the front ends
(the CLI's options, the page's fields) take them from there instead of repeating them (PEFT's ``field(metadata=
{"help": ...})``).

    @dataclass
    class Recipe:
        epochs: int = setting(10, "Passes over the training set", check=ints(1, MAX_EPOCHS))

        def __post_init__(self) -> None:
            check_settings(self)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from adaptkit.checks import check_choice, check_float, check_int

__all__ = ["setting", "ints", "floats", "choices", "check_settings", "help_of", "default_of", "bounds_of"]

Check = Callable[[str, Any], Any]


def setting(default: Any, help: str, *, check: Check | None = None) -> Any:  # noqa: A002 - the metadata key
    """A dataclass field with its ``help`` (one line, as the CLI and the page show it) and its ``check``
    (``check(name, value)`` raises a ConfigError naming the setting), run by :func:`check_settings`."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


def ints(low: int | None = None, high: int | None = None, *, optional: bool = False) -> Check:
    """A whole number in ``[low, high]`` (None too when ``optional``)."""
    return functools.partial(check_int, low=low, high=high, optional=optional)


def floats(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
           optional: bool = False) -> Check:
    """A finite number in the range (open at either end), None too when ``optional``."""
    return functools.partial(check_float, low=low, high=high, low_open=low_open, high_open=high_open,
                             optional=optional)


def choices(*names: str) -> Check:
    """One of ``names``."""
    return functools.partial(check_choice, choices=names)


def check_settings(obj: Any) -> None:
    """Run every field's check on ``obj``, in the order the fields are declared.

    Raises:
        ConfigError: from the first setting that fails its check.
    """
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        if check is not None:
            check(f.name, getattr(obj, f.name))


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def help_of(cls: type, name: str) -> str:
    """The help of setting ``name`` of the config class ``cls``."""
    return _field(cls, name).metadata.get("help", "")


def default_of(cls: type, name: str) -> Any:
    """The default of setting ``name`` of the config class ``cls``."""
    return _field(cls, name).default


def bounds_of(cls: type, name: str) -> tuple[Any, Any]:
    """The ``(low, high)`` a setting's range check allows (None where it is open-ended), for a page's number field."""
    check = _field(cls, name).metadata.get("check")
    keywords = getattr(check, "keywords", {})
    return keywords.get("low"), keywords.get("high")

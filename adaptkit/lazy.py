"""Names a package imports on first use (PEP 562), so that importing it (and the command line, which does) costs no
torch until a name that needs it is used.

    _WHERE = {"Predictor": "adaptkit.inference.predictor", ...}
    __getattr__, __dir__ = lazy_names(__name__, _WHERE)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(package: str, where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``, whose names ``where`` maps to the module that
    defines each; a name is imported on its first look-up and then kept in the package (later look-ups are plain)."""
    namespace = vars(sys.modules[package])

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *where])

    return __getattr__, __dir__

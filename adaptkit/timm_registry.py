"""adaptkit's own ViTs (:mod:`adaptkit.models`) join timm's registry as soon as timm is imported, so
``import adaptkit`` makes ``timm.create_model("vit_cifar_tiny_patch4_32")`` work without paying for timm itself.

:func:`register_with_timm` registers them at once when timm is loaded already; else it puts a one-shot finder on
``sys.meta_path`` that imports :mod:`adaptkit.models` right after timm's own module has run.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

__all__ = ["register_with_timm"]

_MODELS = "adaptkit.models"


def _register() -> None:
    try:
        importlib.import_module(_MODELS)
    except Exception as exc:  # noqa: BLE001 - timm must still import; adaptkit's own models are then missing
        warnings.warn(f"adaptkit's ViTs could not join timm's registry: {exc}", stacklevel=2)


class _AfterTimm:
    """A meta path finder: finds timm as the other finders do, and makes its loader register adaptkit's models
    after it ran (no ``importlib.abc`` or ``importlib.util``: ``import adaptkit`` stays a millisecond)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "timm":
            return None
        sys.meta_path.remove(self)  # one use: the finders below now find timm
        spec = next((found for finder in sys.meta_path if hasattr(finder, "find_spec")
                     for found in [finder.find_spec(name, path, target)] if found is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def register_with_timm() -> None:
    """Register adaptkit's ViTs with timm now (timm loaded) or right after timm is first imported."""
    if "timm" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTimm())

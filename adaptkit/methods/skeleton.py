"""Building a task's modules only to give them saved tensors: on the meta device, with no initialisation.

:meth:`Method.attach` with a saved state builds the modules on the meta device (no memory) and then takes the saved
tensors as their parameters, so whatever the modules' constructors would draw is thrown away. ``torch.device("meta")``
still runs each ``torch.nn.init`` function through its Python arithmetic and its meta decomposition (half the cost of
building an adapter's modules); :func:`skeleton` is the same device context that also returns a meta tensor given to a
``torch.nn.init`` function as it is. Tensors on another device (a method copying real weights) are initialised as
usual.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["skeleton"]

try:  # torch's own device context (what ``with torch.device(...)`` enters), extended below
    from torch.utils._device import DeviceContext, _device_constructors
except ImportError:  # pragma: no cover - a torch without it: the plain meta device, initialisation and all
    DeviceContext = None


# in-place fills some ``torch.nn.init`` functions end in without passing through the mode themselves
_FILLS = {torch.Tensor.zero_, torch.Tensor.fill_, torch.Tensor.uniform_, torch.Tensor.normal_}

if DeviceContext is not None:

    class _Skeleton(DeviceContext):
        """``torch.device("meta")`` that skips ``torch.nn.init`` on meta tensors (there is nothing to fill)."""

        def __init__(self) -> None:
            super().__init__("meta")

        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            if func in _FILLS or getattr(func, "__module__", None) == "torch.nn.init":
                target = args[0] if args else kwargs.get("tensor")
                if isinstance(target, torch.Tensor) and target.is_meta:
                    return target
            if func in _device_constructors() and kwargs.get("device") is None:
                kwargs["device"] = self.device
            return func(*args, **kwargs)


def skeleton() -> contextlib.AbstractContextManager:
    """A context in which modules are built on the meta device without initialising their parameters."""
    return _Skeleton() if DeviceContext is not None else torch.device("meta")

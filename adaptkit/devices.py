"""Which device to run on: the user's choice checked against what this machine has, before anything is loaded."""

from __future__ import annotations

import torch

from adaptkit.errors import ConfigError, param

__all__ = ["resolve_device"]

_KINDS = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
          "mps": lambda: hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}


def resolve_device(choice: str | torch.device | None, check_available: bool = True) -> torch.device:
    """The device named by ``choice`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``), or CUDA when available for None.

    Args:
        choice: the device's name, a ``torch.device``, or None.
        check_available: also refuse a device this machine does not have (off: only check the name).

    Raises:
        ConfigError: the name is not a device, or this machine does not have it.
    """
    if choice is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(choice, (str, torch.device)):
        raise ConfigError(f"device must be a name such as cpu or cuda, got {choice!r}")
    try:
        device = torch.device(choice.strip().lower() if isinstance(choice, str) else choice)
    except RuntimeError:
        device = None
    if device is None or device.type not in _KINDS:
        raise ConfigError(f"unknown device {str(choice)!r}: use cpu, cuda, cuda:N or mps")
    if not check_available:
        return device
    if not _KINDS[device.type]():
        raise ConfigError(f"device {str(choice)!r} was asked for but this machine has no {device.type.upper()} "
                          f"device that torch can use: pick cpu ({param('device', 'cpu')})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(choice)!r} does not exist: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s), cuda:0 to cuda:N-1")
    return device

"""Activation checkpointing while a task trains: keep each block's input, recompute its inside in the backward pass.

It trades about one more forward pass for the activations of every block (timm's ``set_grad_checkpointing``, which
runs the blocks through non-reentrant ``torch.utils.checkpoint``, so the sites' task modules inside a block get their
gradients). Worth it for full fine-tuning and methods with modules in every block; the linear probe keeps nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from adaptkit.errors import ConfigError, param

__all__ = ["activation_checkpointing"]


@contextlib.contextmanager
def activation_checkpointing(trunk: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Turn checkpointing on for ``trunk`` inside the block and restore its previous setting after it.

    Args:
        trunk: a timm ViT (the shared backbone or a task's private copy).
        enabled: False leaves the trunk as it is.
    """
    if not enabled:
        yield
        return
    if not hasattr(trunk, "set_grad_checkpointing"):
        raise ConfigError(f"{type(trunk).__name__} has no activation checkpointing in timm: drop "
                          f"{param('checkpointing')}")
    before = bool(getattr(trunk, "grad_checkpointing", False))
    trunk.set_grad_checkpointing(True)
    try:
        yield
    finally:
        trunk.set_grad_checkpointing(before)

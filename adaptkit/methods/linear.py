"""Baselines: ``linear`` trains the head alone (a linear probe); ``full`` trains every parameter of a private copy."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaptkit.methods.base import Method, private_trunk
from adaptkit.methods.sites import TaskContext
from adaptkit.trunk import AFTER_BLOCKS  # the norms after the last block train with the last blocks

__all__ = ["LinearConfig", "LinearMethod", "FullConfig", "FullMethod"]


@dataclass
class LinearConfig:
    """The linear probe has no settings."""


@dataclass
class FullConfig:
    """Full fine-tuning has no settings of its own."""


class LinearMethod(Method):
    """The head alone, on the frozen backbone's features."""

    name = "linear"
    config_class = LinearConfig
    takes_blocks = False

    def inject(self, trunk: nn.Module, ctx: TaskContext, slot: str):
        return trunk, {}, {}


class FullMethod(Method):
    """Every parameter of a private, trainable copy of the backbone (the shared one is never touched).

    With ``blocks`` only the last blocks and the norms after them train (partial fine-tuning), and only they are
    the task's state: the frozen blocks before them equal the shared backbone's.
    """

    name = "full"
    config_class = FullConfig

    def inject(self, trunk: nn.Module, ctx: TaskContext, slot: str):
        own = private_trunk(trunk)
        if self.blocks is None:
            return own, {"backbone": own}, {}
        own.requires_grad_(False)
        parts: dict[str, nn.Module] = {f"blocks.{i}": own.blocks[i] for i in self.block_indices(own)}
        for name in AFTER_BLOCKS:
            layer = getattr(own, name, None)
            if layer is not None and any(True for _ in layer.parameters()):
                parts[name] = layer
        for module in parts.values():
            module.requires_grad_(True)
        return own, parts, {}

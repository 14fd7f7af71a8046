"""Baselines: ``linear`` trains the head alone (a linear probe); ``full`` trains every parameter of a private copy."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaptkit.methods.base import Method, TaskContext, private_trunk

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

    def inject(self, trunk: nn.Module, ctx: TaskContext, slot: str):
        return trunk, {}, {}


class FullMethod(Method):
    """Every parameter: a private, trainable copy of the backbone (the shared one is never touched)."""

    name = "full"
    config_class = FullConfig

    def inject(self, trunk: nn.Module, ctx: TaskContext, slot: str):
        own = private_trunk(trunk)
        return own, {"backbone": own}, {}

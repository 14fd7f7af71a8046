"""BitFit (Zaken et al. 2021): only the bias terms train.

The backbone is frozen and shared by many tasks, so its own biases never change: each task holds a bias *delta* per
layer that has a bias (init 0: the model starts equal to the backbone), added after the layer in a site, which is
the same as training that layer's bias. In a mixed batch every sample gets its own task's deltas.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaptkit.methods.affine import inject_affine
from adaptkit.methods.base import Method
from adaptkit.methods.sites import TaskContext

__all__ = ["BitFitConfig", "BitFitMethod"]


@dataclass
class BitFitConfig:
    """BitFit has no settings: every bias of the backbone gets a delta."""


class BitFitMethod(Method):
    """A delta for every bias of the backbone, plus the head."""

    name = "bitfit"
    config_class = BitFitConfig

    def inject(self, trunk: nn.Module, ctx: TaskContext, slot: str):
        return inject_affine(trunk, ctx, slot, self.block_indices(trunk), scale=False, role="bias_delta")

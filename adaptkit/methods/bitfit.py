"""BitFit (Zaken et al. 2021): only the bias terms train.

The backbone is frozen and shared by many tasks, so its own biases never change: each task holds a bias *delta* per
layer that has a bias (init 0: the model starts equal to the backbone), added after the layer in a site, which is
the same as training that layer's bias. In a mixed batch every sample gets its own task's deltas.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaptkit.methods.affine import AffineSite, ChannelAffine, affine_layers, out_channels
from adaptkit.methods.base import Method, TaskContext, find_site

__all__ = ["BitFitConfig", "BitFitMethod"]


@dataclass
class BitFitConfig:
    """BitFit has no settings: every bias of the backbone gets a delta."""


class BitFitMethod(Method):
    """A delta for every bias of the backbone, plus the head."""

    name = "bitfit"
    config_class = BitFitConfig

    def inject(self, trunk: nn.Module, ctx: TaskContext, slot: str):
        parts, sites = {}, {}
        for path, layer in affine_layers(trunk, with_bias=True):
            site = find_site(trunk, path, AffineSite, ctx)
            module = ChannelAffine(out_channels(layer), scale=False)
            site.add(slot, module)
            parts[f"{path}.bias_delta"] = module
            sites[path] = site
        return trunk, parts, sites

"""SSF (Lian et al. 2022, "Scaling & Shifting Your Features"): a learned per-channel scale and shift after every
linear, norm and patch-embedding layer of the frozen backbone.

Scales start at 1 and shifts at 0, so the adapted model starts equal to the backbone. Both are linear in the layer's
output, so :func:`merge_ssf` folds them into a copy of the weights for inference at no extra cost.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from adaptkit.families import bias_flag_patch
from adaptkit.methods.affine import ChannelAffine, fold_affine, inject_affine
from adaptkit.methods.base import Method, TaskModel, plain_copy
from adaptkit.methods.sites import TaskContext

__all__ = ["SsfConfig", "SsfMethod", "merge_ssf"]


@dataclass
class SsfConfig:
    """SSF has no settings: every linear, norm and patch-embedding layer gets a scale and a shift."""


class SsfMethod(Method):
    """Per-channel scale and shift after every linear and norm layer, plus the head."""

    name = "ssf"
    config_class = SsfConfig

    def inject(self, trunk: nn.Module, ctx: TaskContext, slot: str):
        return inject_affine(trunk, ctx, slot, self.block_indices(trunk), scale=True, role="ssf")


@torch.no_grad()
def merge_ssf(task: TaskModel) -> nn.Module:
    """A plain copy of the task's trunk with its scales and shifts folded into the weights, followed by its head.

    A BitFit task's bias deltas fold the same way (a shift without a scale).
    """
    merged = plain_copy(task.trunk)
    for part_name, module in task.parts.items():
        if isinstance(module, ChannelAffine):
            path = part_name.rsplit(".", 1)[0]
            fold_affine(merged.get_submodule(path), module)
            patch = bias_flag_patch(merged, path)  # the layer has its own bias now: its attention must call it
            if patch is not None:
                setattr(patch[0], patch[1], True)
    return nn.Sequential(merged, copy.deepcopy(task.head)).eval()

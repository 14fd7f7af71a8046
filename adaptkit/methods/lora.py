"""LoRA (Hu et al. 2021) on the attention's qkv projection, and optionally its output projection and the MLP.

``W x + (alpha / r) * B A x`` with A Kaiming-uniform and B zero, so the update starts at exactly zero. The update can
be folded into a copy of the weights (:func:`merge_lora`) so that inference costs nothing extra.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptkit.checks import MAX_RANK, check_float, check_int
from adaptkit.errors import ConfigError
from adaptkit.families import LINEARS, linear_paths
from adaptkit.methods.base import Method, TaskModel, plain_copy
from adaptkit.methods.sites import Bank, TaskContext, TaskSite, add_product, find_site, put_rows

__all__ = ["LoraConfig", "LoraUpdate", "LoraSite", "LoraMethod", "merge_lora"]

TARGETS = tuple(LINEARS)  # qkv, proj, fc1, fc2: which layers each is in a block is the family's (LINEARS)


@dataclass
class LoraConfig:
    """Settings of LoRA.

    Args:
        rank: rank r of the update.
        alpha: the update is scaled by alpha / r.
        targets: which linear layers of each block get an update: any of qkv, proj, fc1, fc2.
        dropout: dropout on the update's input while training.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("qkv",)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_int("lora rank", self.rank, 1, MAX_RANK)
        check_float("lora alpha", self.alpha)
        self.targets = tuple(self.targets.split(",") if isinstance(self.targets, str) else self.targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"lora targets must be some of {', '.join(TARGETS)}, got {list(self.targets)}")
        check_float("lora dropout", self.dropout, 0, 1, high_open=True)


class LoraUpdate(nn.Module):
    """The low-rank update ``scaling * B A x`` of one linear layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        if not self.lora_A.is_meta:  # built for saved tensors (Method.attach with a state): nothing to initialise
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.drop(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + self(x)`` in one pass over ``y`` (scaling folded into the rank-r intermediate)."""
        h = (self.drop(x) @ self.lora_A.t()) * self.scaling  # (..., r)
        return add_product(y, h, self.lora_B.t().to(h.dtype))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling


class LoraSite(TaskSite):
    """Wraps an ``nn.Linear``: ``base(x) + update(x)``."""

    def forward_task(self, x: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x)
        return y if module is None else module.add_to(y, x)

    def forward_mixed(self, x: torch.Tensor, idx: torch.Tensor, bank: Bank | None, *args: Any,
                      **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x)
        if bank is None:
            return y
        rank = max(bank.held())  # this batch's widest update, not the bank's
        a, b, scaling = bank["a"][:, :, :rank], bank["b"][:, :rank], bank["scaling"]
        rows = self.ctx.rows(bank.present())
        if rows is not None:  # only the samples whose task has an update here
            return put_rows(y, rows, self._update(x[rows], y[rows], idx[rows], a, b, scaling))
        return self._update(x, y, idx, a, b, scaling)

    @staticmethod
    def _update(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scaling: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(x, a[idx]) * scaling[idx]  # (B, N, r)
        return add_product(y, h, b[idx])  # (B, N, out), one pass over y

    def bank_row(self, module: nn.Module) -> dict[str, torch.Tensor]:
        a = module.lora_A.detach()
        return {"a": a.t(), "b": module.lora_B.detach().t(), "scaling": a.new_full((1, 1), module.scaling)}

    def row_info(self, module: nn.Module) -> int:
        return module.lora_A.shape[0]  # the rank


class LoraMethod(Method):
    """Low-rank updates of attention (and optionally MLP) weights, plus the head."""

    name = "lora"
    config_class = LoraConfig

    def refusal(self, trunk: nn.Module) -> str | None:
        block = trunk.blocks[-1]
        missing = [t for t in self.config.targets if not linear_paths(block, t)]
        if missing:
            return f"its blocks have no {'/'.join(missing)} linear layer for LoRA's targets"
        return None

    def inject(self, trunk: nn.Module, ctx: TaskContext, slot: str):
        cfg = self.config
        parts, sites = {}, {}
        for i in self.block_indices(trunk):
            paths = [p for target in cfg.targets for p in linear_paths(trunk.blocks[i], target)]
            for path in (f"blocks.{i}.{p}" for p in paths):
                site = find_site(trunk, path, LoraSite, ctx)
                base = site.layer
                module = LoraUpdate(base.in_features, base.out_features, cfg.rank, cfg.alpha, cfg.dropout)
                site.add(slot, module)
                parts[f"{path}.lora"] = module
                sites[path] = site
        return trunk, parts, sites


@torch.no_grad()
def merge_lora(task: TaskModel) -> nn.Module:
    """A plain copy of the task's trunk with its LoRA updates folded into the weights, followed by its head."""
    merged = plain_copy(task.trunk)
    for part_name, update in task.parts.items():
        if isinstance(update, LoraUpdate):
            layer = merged.get_submodule(part_name.rsplit(".", 1)[0])  # "blocks.0.attn.qkv.lora" -> the linear
            layer.weight += update.delta_weight().to(layer.weight.dtype)
    return nn.Sequential(merged, copy.deepcopy(task.head)).eval()

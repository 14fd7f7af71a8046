"""Bottleneck adapters in every block of a frozen ViT.

* ``parallel``: beside the MLP, same input, output scaled by ``s`` (AdaptFormer, Chen et al. 2022; the parallel
  adapter of He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").
* ``sequential``: after the MLP, on its output (Pfeiffer et al. 2021).
* ``houlsby``: after attention and after the MLP (Houlsby et al. 2019).

The down-projection is initialised as in AdaptFormer/LoRA (Kaiming-uniform, a=sqrt(5)); the up-projection and both
biases start at zero, so at step 0 each adapter adds exactly zero and the model equals the backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.errors import ConfigError
from adaptkit.methods.base import Method, TaskContext, TaskSite, find_site

__all__ = ["AdapterConfig", "Bottleneck", "AdapterSite", "AdapterMethod"]

PLACEMENTS = ("parallel", "sequential", "houlsby")
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclass
class AdapterConfig:
    """Settings of the bottleneck adapter.

    Args:
        rank: bottleneck width r (d -> r -> d).
        placement: ``parallel`` (default), ``sequential`` or ``houlsby``.
        scale: multiplier on the adapter's output; None means 0.1 for ``parallel`` (AdaptFormer) and 1.0 otherwise.
        dropout: dropout inside the bottleneck while training.
        act: non-linearity, one of gelu, relu, silu.
    """

    rank: int = 64
    placement: str = "parallel"
    scale: float | None = None
    dropout: float = 0.0
    act: str = "gelu"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"adapter rank must be a positive integer, got {self.rank!r}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"adapter placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"adapter act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter dropout must be in [0, 1), got {self.dropout!r}")
        if self.scale is None:
            self.scale = 0.1 if self.placement == "parallel" else 1.0


class Bottleneck(nn.Module):
    """``scale * up(drop(act(down(x))))``: d -> r -> d, starting at exactly zero."""

    def __init__(self, dim: int, rank: int, scale: float, act: str, dropout: float, parallel: bool) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale, self.act, self.parallel = scale, act, parallel
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(ACTIVATIONS[self.act](self.down(x)))) * self.scale

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + self(x)`` in one pass over ``y``: the up-projection's bias rides on a column of ones."""
        h = _with_ones(self.drop(ACTIVATIONS[self.act](self.down(x))))  # (..., r + 1)
        w = torch.cat([self.up.weight.t(), self.up.bias[None]]) * self.scale  # (r + 1, d)
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), w.to(h.dtype)).view_as(y)


def _with_ones(h: torch.Tensor) -> torch.Tensor:
    """``h`` with a last column of ones, so that a bias stored as the weight's last row is added by the GEMM."""
    return torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)


class AdapterSite(TaskSite):
    """Wraps an MLP or attention layer: ``y = base(x); y + a(x)`` (parallel) or ``y + a(y)`` (sequential)."""

    def forward_task(self, x: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if module is None:
            return y
        return module.add_to(y, x if module.parallel else y)

    def forward_mixed(self, x: torch.Tensor, idx: torch.Tensor, bank: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        parallel, sequential = bank
        out = y
        if parallel is not None:
            out = _apply_bank(parallel, x, idx, out)
        if sequential is not None:
            out = _apply_bank(sequential, y, idx, out)
        return out

    def build_bank(self, modules: list[nn.Module | None]) -> Any:
        return (_stack([m if m is not None and m.parallel else None for m in modules]),
                _stack([m if m is not None and not m.parallel else None for m in modules]))


def _stack(modules: list[Bottleneck | None]) -> dict[str, Any] | None:
    """Stack bottlenecks of any ranks into banks, zero-padded; None if all absent.

    ``down`` is (T, d, r_max); ``up`` is (T, r_max + 1, d), scaled, with the up bias as its last row.
    """
    present = [m for m in modules if m is not None]
    if not present:
        return None
    ref = present[0].down.weight
    dim, rank, count = ref.shape[1], max(m.down.weight.shape[0] for m in present), len(modules)
    down = ref.new_zeros(count, dim, rank)
    down_bias = ref.new_zeros(count, 1, rank)
    up = ref.new_zeros(count, rank + 1, dim)
    acts = list(dict.fromkeys(m.act for m in present))
    for i, m in enumerate(modules):
        if m is None:
            continue
        r = m.down.weight.shape[0]
        down[i, :, :r] = m.down.weight.detach().t()
        down_bias[i, 0, :r] = m.down.bias.detach()
        up[i, :r] = m.up.weight.detach().t() * m.scale
        up[i, rank] = m.up.bias.detach() * m.scale
    act_of_slot = torch.tensor([acts.index(m.act) if m is not None else 0 for m in modules], device=ref.device)
    return {"down": down, "down_bias": down_bias, "up": up, "acts": acts, "act_of_slot": act_of_slot}


def _apply_bank(bank: dict[str, Any], x: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` plus every sample b through the bottleneck of slot ``idx[b]``: two batched matrix products.

    x, y: (B, N, d).
    """
    h = torch.baddbmm(bank["down_bias"][idx], x, bank["down"][idx])  # (B, N, r)
    acts = bank["acts"]
    if len(acts) == 1:
        h = ACTIVATIONS[acts[0]](h)
    else:
        which = bank["act_of_slot"][idx]
        h = torch.stack([ACTIVATIONS[acts[int(which[b])]](h[b]) for b in range(h.shape[0])])
    return torch.baddbmm(y, _with_ones(h), bank["up"][idx].to(h.dtype))  # (B, N, r + 1) -> (B, N, d)


class AdapterMethod(Method):
    """Bottleneck adapters in every block (or the last ``blocks``), plus the head."""

    name = "adapter"
    config_class = AdapterConfig

    def inject(self, trunk: nn.Module, ctx: TaskContext, slot: str):
        cfg = self.config
        dim = int(trunk.num_features)
        targets = [("mlp", cfg.placement == "parallel")]
        if cfg.placement == "houlsby":
            targets.insert(0, ("attn", False))
        parts, sites = {}, {}
        for i in self.block_indices(trunk):
            for layer, parallel in targets:
                path = f"blocks.{i}.{layer}"
                site = find_site(trunk, path, AdapterSite, ctx)
                module = Bottleneck(dim, cfg.rank, float(cfg.scale), cfg.act, cfg.dropout, parallel)
                site.add(slot, module)
                parts[f"{path}.adapter"] = module
                sites[path] = site
        return trunk, parts, sites

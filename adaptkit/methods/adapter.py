"""Bottleneck adapters in every block of a frozen ViT.

* ``parallel``: beside the MLP, same input, output scaled by ``s`` (AdaptFormer, Chen et al. 2022; the parallel
  adapter of He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").
* ``sequential``: after the MLP, on its output (Pfeiffer et al. 2021).
* ``houlsby``: after attention and after the MLP (Houlsby et al. 2019).
* ``adapterplus``: Adapter+ (Steitz & Roth, CVPR 2024): the post-adapter position (on the MLP's output, before the
  residual add, as ``sequential``), a learned per-channel scale (init 1) instead of a fixed scalar, and Houlsby's
  near-identity initialisation; rank 8 by default.

The down-projection is initialised as in AdaptFormer/LoRA (Kaiming-uniform, a=sqrt(5)); the up-projection and both
biases start at zero, so at step 0 each adapter adds exactly zero and the model equals the backbone. Houlsby's
initialisation (``init="houlsby"``, Adapter+'s) draws both projections from a normal with std 0.01 truncated at two
standard deviations: the model starts near the backbone, not equal to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.checks import MAX_RANK, check_float, check_int
from adaptkit.errors import ConfigError
from adaptkit.methods.base import Method
from adaptkit.methods.sites import Bank, TaskContext, TaskSite, add_product, find_site, put_rows

__all__ = ["AdapterConfig", "Bottleneck", "AdapterSite", "AdapterMethod"]

PLACEMENTS = ("parallel", "sequential", "houlsby", "adapterplus")
SCALINGS = ("scalar", "channel")
INITS = ("lora", "houlsby")
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
ACT_NAMES = tuple(ACTIVATIONS)


@dataclass
class AdapterConfig:
    """Settings of the bottleneck adapter.

    Args:
        rank: bottleneck width r (d -> r -> d); None means 8 for ``adapterplus`` and 64 otherwise.
        placement: ``parallel`` (default), ``sequential``, ``houlsby`` or ``adapterplus``.
        scale: multiplier on the adapter's output; None means 0.1 for ``parallel`` (AdaptFormer) and 1.0 otherwise.
        dropout: dropout inside the bottleneck while training.
        act: non-linearity, one of gelu, relu, silu.
        scaling: ``scalar`` (a fixed ``scale``) or ``channel`` (a learned vector, init ``scale``); None means
            ``channel`` for ``adapterplus`` and ``scalar`` otherwise.
        init: ``lora`` (up-projection zero: exact identity at step 0) or ``houlsby`` (near zero); None means
            ``houlsby`` for ``adapterplus`` and ``lora`` otherwise.
    """

    rank: int | None = None
    placement: str = "parallel"
    scale: float | None = None
    dropout: float = 0.0
    act: str = "gelu"
    scaling: str | None = None
    init: str | None = None

    def __post_init__(self) -> None:
        plus = self.placement == "adapterplus"
        if self.rank is None:
            self.rank = 8 if plus else 64
        if self.scaling is None:
            self.scaling = "channel" if plus else "scalar"
        if self.init is None:
            self.init = "houlsby" if plus else "lora"
        check_int("adapter rank", self.rank, 1, MAX_RANK)
        check_float("adapter scale", self.scale, optional=True)
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"adapter placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"adapter act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        check_float("adapter dropout", self.dropout, 0, 1, high_open=True)
        if self.scaling not in SCALINGS:
            raise ConfigError(f"adapter scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if self.init not in INITS:
            raise ConfigError(f"adapter init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.scale is None:
            self.scale = 0.1 if self.placement == "parallel" else 1.0


class Bottleneck(nn.Module):
    """``scale * up(drop(act(down(x))))``: d -> r -> d, starting at zero (``lora`` init) or near it (``houlsby``).

    ``scale`` is a float, or with ``channel`` a learned (d,) vector that starts at that float (Adapter+).
    """

    def __init__(self, dim: int, rank: int, scale: float, act: str, dropout: float, parallel: bool,
                 channel: bool = False, init: str = "lora") -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale: float | nn.Parameter = nn.Parameter(torch.full((dim,), scale)) if channel else scale
        self.act, self.parallel = act, parallel
        if self.down.weight.is_meta:  # built for saved tensors (Method.attach with a state): nothing to initialise
            return
        if init == "houlsby":
            for w in (self.down.weight, self.up.weight):
                nn.init.trunc_normal_(w, std=0.01, a=-0.02, b=0.02)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(ACTIVATIONS[self.act](self.down(x)))) * self.scale

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + self(x)`` in one pass over ``y``: the up-projection's bias rides on a column of ones."""
        h = _with_ones(self.drop(ACTIVATIONS[self.act](self.down(x))))  # (..., 1 + r)
        w = torch.cat([self.up.bias[None], self.up.weight.t()]) * self.scale  # (1 + r, d)
        return add_product(y, h, w.to(h.dtype))


def _with_ones(h: torch.Tensor) -> torch.Tensor:
    """``h`` with a first column of ones, so that a bias stored as the weight's first row is added by the GEMM (first,
    so that rows padded to a wider rank keep it in place)."""
    return torch.cat([h.new_ones(*h.shape[:-1], 1), h], dim=-1)


class AdapterSite(TaskSite):
    """Wraps an MLP or attention layer: ``y = base(x); y + a(x)`` (parallel) or ``y + a(y)`` (sequential)."""

    def forward_task(self, x: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if module is None:
            return y
        return module.add_to(y, x if module.parallel else y)

    def forward_mixed(self, x: torch.Tensor, idx: torch.Tensor, bank: Bank | None, *args: Any,
                      **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if bank is None:
            return y
        out = y
        for parallel, inputs in ((False, y), (True, x)):  # sequential first: it reads y before y is written
            present = bank.present(lambda info, p=parallel: info.parallel == p)
            if not any(present):
                continue
            kind = [info for info, here in zip(bank.infos, present, strict=True) if here]
            rows = self.ctx.rows(present)
            if rows is None:
                out = _apply_bank(bank, kind, inputs, idx, out)
            else:  # only the samples whose task has an adapter of this kind here
                out = put_rows(out, rows, _apply_bank(bank, kind, inputs[rows], idx[rows], out[rows]))
        return out

    def bank_row(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``down`` (d, r), ``down_bias`` (1, r), ``up`` (1 + r, d) scaled, its bias the first row, and ``act``."""
        down = module.down
        up = torch.cat([module.up.bias.detach()[None], module.up.weight.detach().t()])
        scale = module.scale.detach() if isinstance(module.scale, torch.Tensor) else module.scale
        return {"down": down.weight.detach().t(), "down_bias": down.bias.detach()[None], "up": up * scale,
                "act": torch.tensor(ACT_NAMES.index(module.act), device=up.device)}

    def row_info(self, module: nn.Module) -> _Kind:
        return _Kind(module.down.weight.shape[0], module.parallel, module.act)


class _Kind(NamedTuple):
    """What a mixed pass needs of one bottleneck."""

    rank: int
    parallel: bool
    act: str


def _apply_bank(bank: Bank, kinds: list[_Kind], x: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` plus every sample b through the bottleneck in bank row ``idx[b]`` (``kinds``: the batch's bottlenecks of
    this kind): two batched matrix products, over the batch's widest rank.

    x, y: (B, N, d).
    """
    rank = max(k.rank for k in kinds)
    h = torch.baddbmm(bank["down_bias"][:, :, :rank][idx], x, bank["down"][:, :, :rank][idx])  # (B, N, r)
    acts = list(dict.fromkeys(k.act for k in kinds))
    if len(acts) == 1:
        h = ACTIVATIONS[acts[0]](h)
    else:
        which = bank["act"][idx].tolist()
        h = torch.stack([ACTIVATIONS[ACT_NAMES[which[b]]](h[b]) for b in range(h.shape[0])])
    return add_product(y, _with_ones(h), bank["up"][:, :rank + 1][idx].to(h.dtype))  # (B, N, 1 + r) -> (B, N, d)


class AdapterMethod(Method):
    """Bottleneck adapters in every block (or the last ``blocks``), plus the head."""

    name = "adapter"
    config_class = AdapterConfig

    def inject(self, trunk: nn.Module, ctx: TaskContext, slot: str):
        cfg = self.config
        dim = int(trunk.num_features)
        targets = [("mlp", cfg.placement == "parallel")]  # adapterplus: on the MLP's output, as sequential
        if cfg.placement == "houlsby":
            targets.insert(0, ("attn", False))
        parts, sites = {}, {}
        for i in self.block_indices(trunk):
            for layer, parallel in targets:
                path = f"blocks.{i}.{layer}"
                site = find_site(trunk, path, AdapterSite, ctx)
                module = Bottleneck(dim, cfg.rank, float(cfg.scale), cfg.act, cfg.dropout, parallel,
                                    channel=cfg.scaling == "channel", init=cfg.init)
                site.add(slot, module)
                parts[f"{path}.adapter"] = module
                sites[path] = site
        return trunk, parts, sites

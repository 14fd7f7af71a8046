"""VPT (Jia et al. 2022, "Visual Prompt Tuning"): learned prompt tokens that the frozen blocks attend to.

* ``deep``: every block gets its own new prompts, which replace the previous block's prompt outputs.
* ``shallow``: prompts enter at the first block only and travel through the rest like the other tokens.

Prompts are appended after the patch tokens (attention has no notion of order once positions are embedded, so this
equals the paper's placement after the class token; a rotary embedding gets identity rows for them, so on RoPE
models they have no position, as register tokens have none, and a relative position bias gets zero rows and columns
for them: :func:`adaptkit.families.tokens_kwargs`, :func:`adaptkit.families.added_tokens`)
and are removed after the last block, so the final norm, the pooling and the head see exactly the positions they
see without prompts. VPT cannot start as the identity: the blocks attend to the prompts from the first step,
whatever their values.

In a mixed batch the tokens are padded to the longest prompt of the batch and every key that is not a real prompt of
the sample's task is masked out of attention, so tasks with prompts of different lengths, and tasks without prompts,
each get their own result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from adaptkit.errors import ConfigError
from adaptkit.families import added_tokens, family_of, tokens_kwargs
from adaptkit.methods.base import Method
from adaptkit.methods.sites import Bank, TaskContext, TaskSite, find_site

__all__ = ["VptConfig", "PromptTokens", "PromptSite", "VptMethod"]

MODES = ("deep", "shallow")
INITS = ("xavier", "normal")


@dataclass
class VptConfig:
    """Settings of VPT.

    Args:
        tokens: number of prompt tokens (per block for ``deep``).
        mode: ``deep`` (new prompts at every block) or ``shallow`` (prompts at the input only).
        init: ``xavier`` (the paper's: uniform in +-sqrt(6 / (3 * patch_area + dim))) or ``normal`` (std 0.02).
        dropout: dropout on the prompts while training (the paper uses 0.1 on some data sets).
    """

    tokens: int = 10
    mode: str = "deep"
    init: str = "xavier"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens < 1:
            raise ConfigError(f"vpt tokens must be a positive integer, got {self.tokens!r}")
        if self.mode not in MODES:
            raise ConfigError(f"vpt mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.init not in INITS:
            raise ConfigError(f"vpt init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"vpt dropout must be in [0, 1), got {self.dropout!r}")


class PromptTokens(nn.Module):
    """One task's prompts at one block.

    Args:
        count: number of prompt tokens of the task.
        dim: token width.
        new: whether this block brings new prompts (``tokens``); otherwise it carries the previous block's.
        first: whether the prompts enter the sequence here (before it, the task's tokens have no prompts).
        last: whether the prompts leave the sequence after this block.
        dropout: dropout on new prompts while training.
    """

    def __init__(self, count: int, dim: int, new: bool, first: bool, last: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.count, self.first, self.last = count, first, last
        self.tokens = nn.Parameter(torch.zeros(count, dim)) if new else None
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def prompts(self) -> torch.Tensor:
        return self.drop(self.tokens)


class PromptSite(TaskSite):
    """Wraps a transformer block: add, replace or carry the task's prompt tokens around it; remove them after the
    last block."""

    def forward_task(self, x: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if module is None:
            return self.base_layer(x, *args, **kwargs)
        n = x.shape[1] - (0 if module.first else module.count)  # the real tokens; the prompts come after them
        if module.tokens is not None:
            prompts = module.prompts().to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :n], prompts], dim=1)
        with added_tokens(module.count):
            y = self.base_layer(x, *args, **tokens_kwargs(kwargs, module.count))
        return y[:, :n] if module.last else y

    def forward_mixed(self, x: torch.Tensor, idx: torch.Tensor, bank: Bank | None, *args: Any,
                      **kwargs: Any) -> torch.Tensor:
        if bank is None:
            return self.base_layer(x, *args, **kwargs)
        held = bank.held()
        width_in = max((m.count for m in held if not m.first), default=0)  # the padded width the tokens came with
        width = max(m.count for m in held)  # the batch's longest prompt here
        n = x.shape[1] - width_in
        carried = x[:, n:]
        if carried.shape[1] < width:
            carried = torch.cat([carried, carried.new_zeros(x.shape[0], width - carried.shape[1], x.shape[2])], 1)
        prompts = carried  # a sample whose task has no prompts here reads a zero row: not new, no valid slot
        if any(m.new for m in held):
            tokens = bank["tokens"][:, :width][idx].to(x.dtype)
            if tokens.shape[1] < width:  # the longest prompt of the batch is carried here, not new
                tokens = torch.cat([tokens, tokens.new_zeros(x.shape[0], width - tokens.shape[1], x.shape[2])], 1)
            prompts = torch.where(bank["new"][idx].view(-1, 1, 1), tokens, carried)
        x = torch.cat([x[:, :n], prompts], dim=1)
        mask = None
        if not all(m is not None and m.count == width for m in bank.infos):  # some slot needs a mask
            valid = bank["valid"][:, :width][idx]  # (B, width): which prompt slots are real prompts of the task
            keep = torch.cat([valid.new_ones(x.shape[0], n), valid], dim=1)
            mask = keep[:, None, None, :]  # (B, 1, 1, keys): True takes part in attention
        with added_tokens(width):
            y = self.base_layer(x, *args, **tokens_kwargs({**kwargs, "attn_mask": mask}, width))
        return y[:, :n] if held[0].last else y

    def bank_row(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``valid`` (W,) marks the task's prompt slots; ``new`` whether it brings ``tokens`` (W, d) here or carries
        the previous block's."""
        device = next(self.base_layer.parameters()).device
        row = {"valid": torch.ones(module.count, dtype=torch.bool, device=device),
               "new": torch.tensor(module.tokens is not None, device=device)}
        if module.tokens is not None:
            row["tokens"] = module.tokens.detach()
        return row

    def row_info(self, module: nn.Module) -> _Prompts:
        return _Prompts(module.count, module.first, module.last, module.tokens is not None)


class _Prompts(NamedTuple):
    """What a mixed pass needs of one task's prompts at a block."""

    count: int
    first: bool
    last: bool
    new: bool


def _init_prompts(tokens: torch.Tensor, init: str, patch_size: tuple[int, ...]) -> None:
    if init == "xavier":  # VPT's "xavier uniform": fan-in of a patch (3 * p * p) plus the width
        bound = math.sqrt(6.0 / (3 * math.prod(patch_size) + tokens.shape[1]))
        nn.init.uniform_(tokens, -bound, bound)
    else:
        nn.init.trunc_normal_(tokens, std=0.02)


class VptMethod(Method):
    """Learned prompt tokens at the input (shallow) or at every block (deep), plus the head."""

    name = "vpt"
    config_class = VptConfig

    def added_tokens(self) -> int:
        return self.config.tokens

    def refusal(self, trunk: nn.Module) -> str | None:
        return family_of(trunk).prompts

    def inject(self, trunk: nn.Module, ctx: TaskContext, slot: str):
        cfg = self.config
        dim = int(trunk.num_features)
        patch_size = tuple(getattr(trunk.patch_embed, "patch_size", (16, 16)))
        blocks = list(self.block_indices(trunk))  # with --blocks K, the prompts enter at block depth - K
        parts, sites = {}, {}
        for i in blocks:
            first, last = i == blocks[0], i == blocks[-1]
            path = f"blocks.{i}"
            site = find_site(trunk, path, PromptSite, ctx)
            module = PromptTokens(cfg.tokens, dim, new=cfg.mode == "deep" or first, first=first, last=last,
                                  dropout=cfg.dropout)
            if module.tokens is not None:
                _init_prompts(module.tokens.data, cfg.init, patch_size)
            site.add(slot, module)
            parts[f"{path}.prompt"] = module
            sites[path] = site
        return trunk, parts, sites

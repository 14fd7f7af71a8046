"""A ViT trunk split at a block: the part before it, which no task changes, and the rest.

Two jobs run the frozen part once and hand its output on: training on cached features
(:mod:`adaptkit.training.feature_cache`) and routed prediction (:meth:`adaptkit.inference.Predictor.predict_auto`),
whose routing pass is a frozen pass anyway.
``run_suffix(trunk, run_prefix(trunk, x, k), k)`` is ``trunk(x)``, op for op, for every ``k``. Either can also
hand back the mean patch token after some blocks (``taps``), which the rejection score reads
(:mod:`adaptkit.inference.token_stats`), at no further pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["AFTER_BLOCKS", "first_changed_block", "splittable", "run_prefix", "run_suffix", "patch_mean"]

AFTER_BLOCKS = ("norm", "fc_norm")  # the trunk's layers after its last block


def first_changed_block(part_names: Iterable[str], depth: int) -> int | None:
    """The first block a task's parts (named by their path in the trunk) change.

    Returns:
        ``depth`` when nothing before the trunk's output changes (the head alone, or the final norm); None when a
        part sits before the first block or somewhere this function does not know, so no prefix can be shared.
    """
    first = depth
    for name in part_names:
        root, _, rest = name.partition(".")
        index = rest.split(".", 1)[0]
        if root == "blocks" and index.isdigit():
            first = min(first, int(index))
        elif name not in AFTER_BLOCKS:
            return None
    return first


def splittable(trunk: nn.Module) -> bool:
    """True when the trunk runs timm's own ``VisionTransformer.forward_features``, which the split reproduces."""
    return isinstance(trunk, VisionTransformer) and type(trunk).forward_features is VisionTransformer.forward_features


def patch_mean(trunk: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """(B, N, d) a block's tokens -> (B, d) the mean of its patch tokens (class and register tokens left out)."""
    return h[:, getattr(trunk, "num_prefix_tokens", 1):].mean(1)


def _blocks(trunk: nn.Module, h: torch.Tensor, start: int, stop: int, taps: dict[int, torch.Tensor] | None
            ) -> torch.Tensor:
    """Blocks ``start`` .. ``stop - 1``; the mean patch token after each block named in ``taps`` is put there."""
    if not taps:
        blocks = trunk.blocks[start:stop]
        return checkpoint_seq(blocks, h) if getattr(trunk, "grad_checkpointing", False) else blocks(h)
    for i in range(start, stop):
        h = trunk.blocks[i](h)
        if i in taps:
            taps[i] = patch_mean(trunk, h)
    return h


def run_prefix(trunk: nn.Module, x: torch.Tensor, start: int, taps: dict[int, torch.Tensor] | None = None
               ) -> torch.Tensor:
    """The trunk up to block ``start``: tokens (B, N, d), or pooled features (B, d) when ``start`` is its depth.

    ``taps``: block indices (the keys; values are overwritten) whose mean patch token (B, d) to hand back in it;
    the index ``depth`` (one past the last block) stands for the pooled output.
    """
    depth = len(trunk.blocks)
    if start == depth and not taps:
        return trunk(x)
    x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(x))))
    x = _blocks(trunk, x, 0, start, taps)
    return _head(trunk, x, taps) if start == depth else x


def run_suffix(trunk: nn.Module, h: torch.Tensor, start: int, taps: dict[int, torch.Tensor] | None = None
               ) -> torch.Tensor:
    """The rest of the trunk from block ``start`` on (as timm's ``forward_features`` and ``forward_head``), with
    ``taps`` as for :func:`run_prefix` (for the blocks it runs)."""
    if start == len(trunk.blocks):
        return h
    return _head(trunk, _blocks(trunk, h, start, len(trunk.blocks), taps), taps)


def _head(trunk: nn.Module, h: torch.Tensor, taps: dict[int, torch.Tensor] | None) -> torch.Tensor:
    pooled = trunk.forward_head(trunk.norm(h), pre_logits=True)
    if taps is not None and len(trunk.blocks) in taps:
        taps[len(trunk.blocks)] = pooled
    return pooled

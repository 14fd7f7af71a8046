"""A ViT trunk split at a block (any family :mod:`adaptkit.families` describes): the part before it, which no task
changes, and the rest.

Two jobs run the frozen part once and hand its output on: training on cached features
(:mod:`adaptkit.training.feature_cache`) and routed prediction (:meth:`adaptkit.inference.Predictor.predict_auto`),
whose routing pass is a frozen pass anyway.
``run_suffix(trunk, run_prefix(trunk, x, k), k)`` is ``trunk(x)``, op for op, for every ``k``. Either can also
hand back the mean patch token after some blocks (``taps``), and the spectrum of the image's patch embeddings
(:func:`patch_spectrum`, the tap :data:`SPECTRUM`), which the rejection score reads
(:mod:`adaptkit.inference.token_stats`), at no further pass of the blocks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from adaptkit.families import block_kwargs, embed, finish, split_supported

__all__ = ["AFTER_BLOCKS", "SPECTRUM", "first_changed_block", "splittable", "run_prefix", "run_suffix", "patch_mean",
           "patch_spectrum"]

AFTER_BLOCKS = ("norm", "fc_norm")  # the trunk's layers after its last block
SPECTRUM = -1  # the tap (before the first block) that holds :func:`patch_spectrum`
SPECTRUM_FLOOR = 1e-4  # added to every eigenvalue: this share of their mean (a grey image's missing ones stay finite)


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
    """True when the trunk's family reproduces its ``forward_features`` (:func:`adaptkit.families.split_supported`):
    timm's ``VisionTransformer``, ``Eva`` and ``Beit``, not a subclass that replaced it."""
    return split_supported(trunk)


def patch_mean(trunk: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """(B, N, d) a block's tokens -> (B, d) the mean of its patch tokens (class and register tokens left out)."""
    return h[:, getattr(trunk, "num_prefix_tokens", 1):].mean(1)


def patch_spectrum(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images -> (B, k) the log eigenvalues, largest first, of the covariance of each image's patch
    embeddings (the patch projection's output, before positions are added), each eigenvalue raised by
    :data:`SPECTRUM_FLOOR` of their mean. ``k`` = min(patches - 1, width, the values of a patch: channels x
    pixels), the eigenvalues that are not zero by construction. An image with fewer colours or less detail than the
    task's (a grey photo: a third of the colour directions; a drawing, a blurred photo) has a spectrum that falls off
    sooner. The covariance is computed as the patches' Gram matrix when there are fewer patches than channels."""
    p = trunk.patch_embed(x)
    p = (p.flatten(1, -2) if p.dim() == 4 else p).double()
    p = p - p.mean(1, keepdim=True)
    n, d = p.shape[1], p.shape[2]
    k = min(n - 1, d, x[0].numel() // n)  # the values of one patch: channels x its pixels
    gram = p @ p.transpose(1, 2) if n <= d else p.transpose(1, 2) @ p
    lam = torch.linalg.eigvalsh(gram / (n - 1)).flip(-1)[:, :k].clamp(min=0)
    return (lam + SPECTRUM_FLOOR * lam.mean(1, keepdim=True).clamp(min=1e-300)).log().float()


def _blocks(trunk: nn.Module, h: torch.Tensor, start: int, stop: int, taps: dict[int, torch.Tensor] | None
            ) -> torch.Tensor:
    """Blocks ``start`` .. ``stop - 1``, each with the keywords its family passes (a rotary embedding, a relative
    position bias); the mean patch token after each block named in ``taps`` is put there."""
    every = block_kwargs(trunk, h)
    checkpointed = getattr(trunk, "grad_checkpointing", False) and torch.is_grad_enabled()
    for i in range(start, stop):
        block = trunk.blocks[i]
        h = checkpoint(block, h, use_reentrant=False, **every[i]) if checkpointed else block(h, **every[i])
        if taps is not None and i in taps:
            taps[i] = patch_mean(trunk, h)
    return h


def run_prefix(trunk: nn.Module, x: torch.Tensor, start: int, taps: dict[int, torch.Tensor] | None = None
               ) -> torch.Tensor:
    """The trunk up to block ``start``: tokens (B, N, d), or pooled features (B, d) when ``start`` is its depth.

    ``taps``: block indices (the keys; values are overwritten) whose mean patch token (B, d) to hand back in it;
    the index ``depth`` (one past the last block) stands for the pooled output, :data:`SPECTRUM` for
    :func:`patch_spectrum` (B, k).
    """
    depth = len(trunk.blocks)
    if start == depth and not taps:
        return trunk(x)
    if taps is not None and SPECTRUM in taps:
        taps[SPECTRUM] = patch_spectrum(trunk, x)
    x = _blocks(trunk, embed(trunk, x), 0, start, taps)
    return _head(trunk, x, taps) if start == depth else x


def run_suffix(trunk: nn.Module, h: torch.Tensor, start: int, taps: dict[int, torch.Tensor] | None = None
               ) -> torch.Tensor:
    """The rest of the trunk from block ``start`` on (as the class's ``forward_features`` and ``forward_head``),
    with ``taps`` as for :func:`run_prefix` (for the blocks it runs)."""
    if start == len(trunk.blocks):
        return h
    return _head(trunk, _blocks(trunk, h, start, len(trunk.blocks), taps), taps)


def _head(trunk: nn.Module, h: torch.Tensor, taps: dict[int, torch.Tensor] | None) -> torch.Tensor:
    pooled = finish(trunk, h)
    if taps is not None and len(trunk.blocks) in taps:
        taps[len(trunk.blocks)] = pooled
    return pooled

"""Per-channel scale and shift of a layer's output: the shared site of SSF (scale and shift) and BitFit (shift only).

A BitFit bias delta ``db`` on ``y = W x + b`` gives ``W x + (b + db) = y + db``, the same as a shift after the layer,
so both methods are one :class:`ChannelAffine` per layer in one kind of site. Tasks of either method (and several
of each) then share a site, and a mixed batch applies every sample's own scale and shift in one ``addcmul``. The
bank holds ``scale - 1``, so that a row of zeros (a task with nothing here) leaves its samples unchanged, as at every
other kind of site: a pass over every sample (an exported ONNX graph's) needs no special case.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from adaptkit.methods.sites import Bank, TaskContext, TaskSite, find_site, put_rows

__all__ = ["ChannelAffine", "AffineSite", "affine_layers", "fold_affine"]

AFFINE_TYPES = (nn.Linear, nn.LayerNorm, nn.Conv2d)


class ChannelAffine(nn.Module):
    """``y * scale + shift`` over the channels of a layer's output; scale 1 and shift 0 at the start (the identity).

    Args:
        channels: the layer's output channels.
        scale: learn a scale (SSF); without it only the shift is learnt (BitFit).
    """

    def __init__(self, channels: int, scale: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels)) if scale else None
        self.shift = nn.Parameter(torch.zeros(channels))


def _innermost(layer: nn.Module) -> nn.Module:
    while isinstance(layer, TaskSite):
        layer = layer.base_layer
    return layer


class AffineSite(TaskSite):
    """Wraps a linear, norm or convolution layer: ``base(x) * scale + shift`` along the output's channel axis."""

    def __init__(self, base_layer: nn.Module, ctx: Any) -> None:
        super().__init__(base_layer, ctx)
        self.channel_dim = 1 if isinstance(self.layer, nn.Conv2d) else -1  # NCHW, else (..., C)

    def _view(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``t`` of shape (C,) or (B, C) shaped to broadcast over ``y`` along the channel axis."""
        shape = [1] * y.dim()
        shape[self.channel_dim] = t.shape[-1]
        if t.dim() == 2:
            shape[0] = t.shape[0]
        return t.view(shape).to(y.dtype)

    def forward_task(self, x: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if module is None:
            return y
        if module.scale is None:
            return y + self._view(module.shift, y)
        return torch.addcmul(self._view(module.shift, y), y, self._view(module.scale, y))

    def forward_mixed(self, x: torch.Tensor, idx: torch.Tensor, bank: Bank | None, *args: Any,
                      **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if bank is None:
            return y
        delta, shift = bank["scale_delta"], bank["shift"]
        rows = self.ctx.rows(bank.present())
        if rows is None:  # every sample (an exported graph's too): a row of zeros leaves its samples unchanged
            return torch.addcmul(y + self._view(shift[idx], y), y, self._view(delta[idx], y))
        idx, part = idx[rows], y[rows]  # only the samples whose task has a module here
        return put_rows(y, rows, torch.addcmul(part + self._view(shift[idx], part), part, self._view(delta[idx], part)))

    def bank_row(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """(C,) ``scale - 1`` and shift, so that a row of zeros (no task here, or row 0) is the identity, as at every
        other kind of site; a module without a scale gets a delta of 0."""
        shift = module.shift.detach()
        delta = torch.zeros_like(shift) if module.scale is None else module.scale.detach() - 1
        return {"scale_delta": delta, "shift": shift}


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """Linear, norm and convolution layers under ``module`` by canonical path (sites looked through, their
    task modules skipped)."""
    for name, child in module.named_children():
        child = _innermost(child)
        path = f"{prefix}{name}"
        if isinstance(child, AFFINE_TYPES):
            yield path, child
        else:
            yield from _walk(child, path + ".")


def affine_layers(trunk: nn.Module, with_bias: bool = False,
                  blocks: Sequence[int] | None = None) -> list[tuple[str, nn.Module]]:
    """The backbone's linear, norm and convolution layers, block by block, then those outside the blocks.

    Args:
        trunk: a timm ViT.
        with_bias: only layers that have a bias (BitFit).
        blocks: only these blocks (default: all); the patch embedding counts as before block 0.

    Returns:
        (canonical path, layer) pairs: the patch embedding, the chosen blocks' layers (one loop over
        ``trunk.blocks``), and the final norms.
    """
    blocks = range(len(trunk.blocks)) if blocks is None else blocks
    found = [(f"patch_embed.{p}", m) for p, m in _walk(_innermost(trunk.patch_embed), "")] if 0 in blocks else []
    for i in blocks:
        found += _walk(_innermost(trunk.blocks[i]), f"blocks.{i}.")
    for name in ("norm", "fc_norm"):
        layer = _innermost(getattr(trunk, name, nn.Identity()))
        if isinstance(layer, AFFINE_TYPES):
            found.append((name, layer))
    return [(p, m) for p, m in found if not with_bias or getattr(m, "bias", None) is not None]


def inject_affine(trunk: nn.Module, ctx: TaskContext, slot: str, blocks: Sequence[int], *, scale: bool,
                  role: str) -> tuple[nn.Module, dict[str, nn.Module], dict[str, AffineSite]]:
    """A :class:`ChannelAffine` for ``slot`` after every affine layer of ``blocks`` (SSF: with a scale; BitFit: a
    bias delta only, on layers that have a bias); parts are named ``<layer path>.<role>``."""
    parts, sites = {}, {}
    for path, layer in affine_layers(trunk, with_bias=not scale, blocks=blocks):
        site = find_site(trunk, path, AffineSite, ctx)
        module = ChannelAffine(out_channels(layer), scale=scale)
        site.add(slot, module)
        parts[f"{path}.{role}"] = module
        sites[path] = site
    return trunk, parts, sites


def out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
    return layer.normalized_shape[-1]


@torch.no_grad()
def fold_affine(layer: nn.Module, module: ChannelAffine) -> None:
    """Fold ``y * scale + shift`` into ``layer``'s own weight and bias (in place): the same output, no extra cost."""
    channels = out_channels(layer)
    if getattr(layer, "weight", None) is None:  # a norm without affine parameters
        layer.weight = nn.Parameter(torch.ones(channels))
    if getattr(layer, "bias", None) is None:
        layer.bias = nn.Parameter(torch.zeros(channels, dtype=layer.weight.dtype, device=layer.weight.device))
    if module.scale is not None:
        scale = module.scale.to(layer.weight.dtype)
        layer.weight.mul_(scale.view(-1, *[1] * (layer.weight.dim() - 1)))
        layer.bias.mul_(scale)
    layer.bias.add_(module.shift.to(layer.bias.dtype))

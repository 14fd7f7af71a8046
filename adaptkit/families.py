"""What differs between timm's Vision Transformer classes, in one place: every method, the trunk split and the
exporters read it here, and no family's name appears anywhere else.

A :class:`Family` says, for the timm classes it covers:

* where a block's attention projections live (``qkv``: the first candidate whose layers all exist: timm's fused
  ``attn.qkv``, or Eva's separate ``attn.q_proj / k_proj / v_proj``), and whether the attention adds the q/k/v bias
  outside the ``qkv`` linear (``outside_bias``: Eva's and BEiT's ``q_bias`` / ``v_bias``), so that a layer wrapped in
  a task site must be called as a layer (the attention's ``qkv_bias_separate`` flag, set while a site is there);
* how the sequence is built and how positions apply: the prefix tokens (class and register tokens, no position),
  absolute position embeddings (added once, before the blocks), rotary embeddings (``rope``, passed to every block
  and applied inside attention to the tokens after the prefix) or a relative position bias (BEiT: sized for the
  backbone's own tokens; added tokens get zero bias rows and columns, :func:`tokens_kwargs` and :func:`added_tokens`);
* the pooling and the final norm (``forward_head``), through :func:`embed`, :func:`block_kwargs` and :func:`finish`,
  which reproduce the class's own ``forward_features`` op for op (:mod:`adaptkit.trunk`).

Adding a family is one entry in :data:`FAMILIES` plus its case in ``tests/family_cases.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Family", "FAMILIES", "family_of", "LINEARS", "linear_paths", "outside_bias", "bias_flag_patch",
           "tokens_kwargs", "added_tokens", "split_supported", "embed", "block_kwargs", "finish"]

# a block's linear layers by role: the first candidate whose layers all exist (fused, else separate layers)
LINEARS: dict[str, tuple[tuple[str, ...], ...]] = {
    "qkv": (("attn.qkv",), ("attn.q_proj", "attn.k_proj", "attn.v_proj")),
    "proj": (("attn.proj",),),
    "fc1": (("mlp.fc1",), ("mlp.fc1_g", "mlp.fc1_x")),  # SwiGLU's gate and value halves
    "fc2": (("mlp.fc2",),),
}


@dataclass(frozen=True)
class Family:
    """One kind of timm ViT.

    Args:
        name: a short label (error messages, the docs' matrix).
        classes: the timm class names it covers (a subclass that keeps the class's ``forward_features`` is covered).
        positions: ``absolute``, ``rotary`` or ``relative``.
        outside_bias: the attention adds ``q_bias`` / ``v_bias`` itself, around the ``qkv`` linear.
        prompts: None when tokens can be added to the sequence (VPT), else why they cannot.
        embed: the tokens before the first block, ``(trunk, images) -> (B, N, d)``; None: no split.
        block_kwargs: the keyword arguments every block takes besides the tokens, ``(trunk, tokens) -> [dict]``.
        finish: the final norm and pooling, ``(trunk, tokens) -> (B, d)``.
        other_head: None when timm's model with ``num_classes=N`` is the backbone plus one linear head on its pooled
            features (as adaptkit's task is, so a PEFT folder on it gives the task's logits), else why not.
    """

    name: str
    classes: tuple[str, ...]
    positions: str = "absolute"
    outside_bias: bool = False
    prompts: str | None = None
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    block_kwargs: Callable[[nn.Module, torch.Tensor], list[dict[str, Any]]] | None = None
    finish: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    other_head: str | None = None


# -- timm's VisionTransformer (ViT, DeiT, DeiT-III, DINOv2 with and without registers, SigLIP, CLIP) ----------------

def _vit_embed(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(x))))


def _no_kwargs(trunk: nn.Module, h: torch.Tensor) -> list[dict[str, Any]]:
    return [{} for _ in trunk.blocks]


def _norm_head(trunk: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return trunk.forward_head(trunk.norm(h), pre_logits=True)


# -- timm's Eva (EVA02, DINOv3, Perception Encoder, the RoPE ViTs): rotary positions passed to every block ----------

def _eva_embed(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(x))[0])


def _eva_rope(trunk: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    """The rotary embedding ``Eva._pos_embed`` computes for these tokens (their grid: the patch grid)."""
    if trunk.rope is None:
        return None
    grid = tuple(trunk.patch_embed.grid_size)
    if h.shape[1] - trunk.num_prefix_tokens != grid[0] * grid[1]:
        raise ValueError(f"{h.shape[1]} tokens do not fit the backbone's {grid} patch grid")
    if hasattr(trunk.rope, "feat_shape") and not trunk.dynamic_img_size:
        return trunk.rope.get_embed()
    return trunk.rope.get_embed(shape=grid)


def _eva_kwargs(trunk: nn.Module, h: torch.Tensor) -> list[dict[str, Any]]:
    rope = _eva_rope(trunk, h)
    if getattr(trunk, "rope_mixed", False) and rope is not None:
        return [{"rope": rope[i]} for i in range(len(trunk.blocks))]
    return [{"rope": rope} for _ in trunk.blocks]


def _eva_finish(trunk: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return trunk.forward_head(trunk.norm(h), pre_logits=True)


# -- timm's Beit: a relative position bias inside attention, sized for the backbone's tokens --------------------------

def _beit_embed(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = trunk.patch_embed(x)
    x = torch.cat((trunk.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if trunk.pos_embed is not None:
        x = x + trunk.pos_embed
    return trunk.pos_drop(x)


def _beit_kwargs(trunk: nn.Module, h: torch.Tensor) -> list[dict[str, Any]]:
    bias = trunk.rel_pos_bias() if trunk.rel_pos_bias is not None else None
    return [{"shared_rel_pos_bias": bias} for _ in trunk.blocks]


FAMILIES: tuple[Family, ...] = (  # a subclass before its base: the first class found in a model's MRO decides
    Family("vit-distilled", ("VisionTransformerDistilled",), embed=_vit_embed, block_kwargs=_no_kwargs,
           finish=_norm_head, other_head="timm's model averages a second, distillation head with the class head"),
    Family("vit", ("VisionTransformer",), embed=_vit_embed, block_kwargs=_no_kwargs, finish=_norm_head),
    Family("eva", ("Eva",), positions="rotary", outside_bias=True, embed=_eva_embed, block_kwargs=_eva_kwargs,
           finish=_eva_finish),
    Family("beit", ("Beit",), positions="relative", outside_bias=True, embed=_beit_embed, block_kwargs=_beit_kwargs,
           finish=_norm_head),
)

OTHER = Family("other", ())  # a timm ViT class not listed: the methods that need nothing of it, no split


def _class_of(trunk: nn.Module) -> tuple[Family, type | None]:
    for klass in type(trunk).__mro__:
        for family in FAMILIES:
            if klass.__name__ in family.classes:
                return family, klass
    return OTHER, None


def family_of(trunk: nn.Module) -> Family:
    """The family of a timm ViT (sites are looked through); :data:`OTHER` for a class no entry covers."""
    return _class_of(_innermost(trunk))[0]


def split_supported(trunk: nn.Module) -> bool:
    """True when the family reproduces this trunk's ``forward_features``: the class is listed and a subclass has not
    replaced it."""
    family, klass = _class_of(trunk)
    return family.embed is not None and type(trunk).forward_features is klass.forward_features


def embed(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return family_of(trunk).embed(trunk, x)


def block_kwargs(trunk: nn.Module, h: torch.Tensor) -> list[dict[str, Any]]:
    return family_of(trunk).block_kwargs(trunk, h)


def finish(trunk: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return family_of(trunk).finish(trunk, h)


def _innermost(layer: Any) -> Any:
    while hasattr(layer, "base_layer") and hasattr(layer, "tasks"):  # a task site
        layer = layer.base_layer
    return layer


def _get(root: nn.Module, path: str) -> Any:
    module: Any = root
    for part in path.split("."):
        module = getattr(_innermost(module), part, None)
        if module is None:
            return None
    return _innermost(module)


def linear_paths(block: nn.Module, role: str) -> tuple[str, ...]:
    """The paths, under a block, of the linear layers of ``role`` (a key of :data:`LINEARS`): for ``qkv``,
    ``attn.qkv`` when fused, else ``attn.q_proj``, ``attn.k_proj``, ``attn.v_proj``; () when the block has none."""
    for paths in LINEARS[role]:
        if all(isinstance(_get(block, p), nn.Linear) for p in paths):
            return paths
    return ()


def outside_bias(root: nn.Module, path: str) -> bool:
    """True when the layer at ``path`` is a fused ``qkv`` whose bias its attention holds and adds itself
    (``q_bias`` / ``v_bias``): for BitFit it has a bias, and a site there needs :func:`bias_flag_patch`."""
    parent_path, _, name = path.rpartition(".")
    parent = _get(root, parent_path) if parent_path else root
    return (name == "qkv" and family_of(root).outside_bias and getattr(parent, "q_bias", None) is not None
            and hasattr(parent, "qkv_bias_separate"))


def bias_flag_patch(root: nn.Module, path: str) -> tuple[nn.Module, str, Any] | None:
    """Where the attention would bypass a site on its ``qkv`` (it calls ``F.linear`` with ``qkv.weight`` and its own
    bias): ``(attention, "qkv_bias_separate", old value)``, the flag that makes it call the layer and add the bias
    after; None elsewhere. The caller sets the flag to True and puts the old value back when the site leaves."""
    if not outside_bias(root, path):
        return None
    attention = _get(root, path.rpartition(".")[0])
    return attention, "qkv_bias_separate", attention.qkv_bias_separate


def tokens_kwargs(kwargs: dict[str, Any], added: int) -> dict[str, Any]:
    """A block's keyword arguments for a sequence with ``added`` tokens appended after its own (VPT's prompts): a
    rotary embedding gets identity rows (sin 0, cos 1) for them, so they have no position, as prefix tokens have
    none; a shared relative position bias (BEiT) gets zero rows and columns for them, and a boolean ``attn_mask``
    (``(B, 1, 1, keys)``, True takes part), which BEiT's blocks do not take, is folded into that bias as ``-inf``.
    Run the block inside :func:`added_tokens` so that a bias its attention computes itself is padded too."""
    if "shared_rel_pos_bias" in kwargs:
        return _beit_tokens_kwargs(kwargs, added)
    rope = kwargs.get("rope")
    if rope is None or added == 0:
        return kwargs
    half = rope.shape[-1] // 2
    pad = rope.new_zeros(*rope.shape[:-2], added, rope.shape[-1])
    pad[..., half:] = 1
    return {**kwargs, "rope": torch.cat([rope, pad], dim=-2)}


# -- BEiT's relative position bias with tokens added after the backbone's own ---------------------------------------

_ADDED: ContextVar[int] = ContextVar("adaptkit_added_tokens", default=0)


@contextmanager
def added_tokens(added: int) -> Iterator[None]:
    """Inside, a BEiT attention's own relative position bias gets ``added`` zero rows and columns (the tokens a block
    sees after the backbone's own: prompts have no position). Per thread and per context, so concurrent calls
    without added tokens see the bias unchanged."""
    if added:
        _install_beit_padding()
    token = _ADDED.set(added)
    try:
        yield
    finally:
        _ADDED.reset(token)


def _beit_tokens_kwargs(kwargs: dict[str, Any], added: int) -> dict[str, Any]:
    bias, mask = kwargs.get("shared_rel_pos_bias"), kwargs.get("attn_mask")
    if bias is not None and added:
        bias = F.pad(bias, (0, added, 0, added))
    if mask is not None:
        dtype = bias.dtype if bias is not None else torch.get_default_dtype()
        fold = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        bias = fold if bias is None else bias + fold
    return {**{k: v for k, v in kwargs.items() if k != "attn_mask"}, "shared_rel_pos_bias": bias}


def _install_beit_padding() -> None:
    """Wrap timm's ``beit.Attention._get_rel_pos_bias`` once: the same bias, padded with zero rows and columns for
    the tokens of :func:`added_tokens` (none outside it, so every other call is unchanged, op for op). Until timm's
    BEiT module is imported no BEiT exists, and there is nothing to wrap."""
    timm_beit = sys.modules.get("timm.models.beit")
    own = getattr(getattr(timm_beit, "Attention", None), "_get_rel_pos_bias", None)
    if own is None or getattr(own, "_adaptkit_padded", False):
        return

    def padded(self: nn.Module) -> torch.Tensor:
        bias, added = own(self), _ADDED.get()
        return F.pad(bias, (0, added, 0, added)) if added else bias

    padded._adaptkit_padded = True
    timm_beit.Attention._get_rel_pos_bias = padded

"""One small random configuration of each ViT family, built by timm from its own model functions and kwargs (depth 2,
width 32, 32x32 images): the cases of ``tests/test_families.py`` and of ``docs/gen_backbones.py``.

Each case is registered with timm under ``adaptkit_case_<key>`` (so that ``create_backbone``, the registry and the
exporters rebuild it by name) and names the timm model it shrinks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
from timm.models import generate_default_cfgs, register_model

__all__ = ["FamilyCase", "CASES", "case_name"]

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


@dataclass(frozen=True)
class FamilyCase:
    """A family's test configuration: ``timm_name``'s model function with ``kwargs`` over :data:`SMALL`."""

    key: str
    label: str  # what people call it
    timm_name: str  # the real model whose class and settings it shrinks
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return case_name(self.key)


CASES: tuple[FamilyCase, ...] = (
    FamilyCase("vit", "ViT / DeiT-III", "vit_base_patch16_224"),
    FamilyCase("deit_distilled", "DeiT distilled (class + distillation token)", "deit_tiny_distilled_patch16_224"),
    FamilyCase("dinov2_reg", "DINOv2 with registers", "vit_small_patch14_reg4_dinov2"),
    FamilyCase("siglip", "SigLIP (attention pooling)", "vit_base_patch16_siglip_224"),
    FamilyCase("clip", "CLIP (pre-norm, quick GELU)", "vit_base_patch16_clip_quickgelu_224"),
    FamilyCase("eva02", "EVA02 (RoPE, SwiGLU, fused qkv + q/v bias)", "eva02_tiny_patch14_224",
               {"ref_feat_shape": (4, 4)}),
    FamilyCase("eva02_qkv", "EVA02-B/L (separate q/k/v)", "eva02_base_patch14_224", {"ref_feat_shape": (4, 4)}),
    FamilyCase("dinov3", "DINOv3 (RoPE, registers)", "vit_small_patch16_dinov3"),
    FamilyCase("pe", "Perception Encoder (RoPE, attention pooling)", "vit_pe_core_tiny_patch16_384",
               {"ref_feat_shape": (4, 4), "attn_pool_num_heads": 2}),
    FamilyCase("rope_vit", "RoPE ViT", "vit_base_patch16_rope_224"),
    FamilyCase("rope_mixed", "RoPE-Mixed ViT (a rotary embedding per block)", "vit_small_patch16_rope_mixed_224"),
    FamilyCase("beit", "BEiT (relative position bias)", "beit_base_patch16_224"),
)


def case_name(key: str) -> str:
    return f"adaptkit_case_{key}"


def _register(case: FamilyCase) -> None:
    if timm.is_model(case.name):
        return

    def build(pretrained: bool = False, **kwargs: Any) -> Any:
        kwargs.pop("pretrained_cfg", None)
        overlay = {**(kwargs.pop("pretrained_cfg_overlay", None) or {}),
                   "input_size": (3, SMALL["img_size"], SMALL["img_size"]), "num_classes": 0}
        return timm.create_model(case.timm_name, pretrained=False, pretrained_cfg_overlay=overlay,
                                 **{**SMALL, **case.kwargs, **kwargs})

    build.__name__ = case.name
    build.__module__ = __name__
    register_model(build)


# each case's own input size, as timm's pretrained config of the name says it (adaptkit reads a backbone's size there)
default_cfgs = generate_default_cfgs({f"{c.name}.untrained": {"input_size": (3, SMALL["img_size"], SMALL["img_size"]),
                                                              "num_classes": 0} for c in CASES})
for _case in CASES:
    _register(_case)

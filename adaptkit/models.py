"""Small ViTs registered with timm by adaptkit, for offline use: tests, the quickstart, CPU work.

* ``vit_pico_patch4_32``: a 32x32-input ViT small enough for unit tests (random weights only).
* ``vit_cifar_tiny_patch4_32``: a small ViT for 32x32 images; its ``adaptkit_c10`` weights ship inside the package
  (trained from scratch on CIFAR-10 by ``examples/pretrain_backbone.py``: 71.8 % test top-1; see
  ``adaptkit/weights/README.md``), so ``--backbone vit_cifar_tiny_patch4_32.adaptkit_c10`` works offline.
"""

from __future__ import annotations

from pathlib import Path

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

__all__ = ["PACKAGED_BACKBONE", "PACKAGED_FINGERPRINT", "WEIGHTS_DIR"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
PACKAGED_BACKBONE = "vit_cifar_tiny_patch4_32.adaptkit_c10"
_PACKAGED_FILE = WEIGHTS_DIR / "vit_cifar_tiny_patch4_32.adaptkit_c10.safetensors"
# adaptkit.backbone.fingerprint of the packaged backbone as loaded (fp16 file -> fp32 model); see weights/README.md
PACKAGED_FINGERPRINT = "4af29a31c4e9e161e6a245773e63b7e7377884b30808c5fd1ad252a2c438cd74"
_CIFAR = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}


def _cfg(**kwargs) -> dict:
    return {"num_classes": 0, "input_size": (3, 32, 32), "fixed_input_size": True, "interpolation": "bicubic",
            "crop_pct": 1.0, "crop_mode": "center", "first_conv": "patch_embed.proj", "classifier": "head",
            "license": "apache-2.0", **_CIFAR, **kwargs}


_tags = {"vit_pico_patch4_32.untrained": _cfg()}
if _PACKAGED_FILE.is_file():
    _tags[PACKAGED_BACKBONE] = _cfg(file=str(_PACKAGED_FILE))
else:
    _tags["vit_cifar_tiny_patch4_32.untrained"] = _cfg()
default_cfgs = generate_default_cfgs(_tags)


@register_model
def vit_pico_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Pico/4 at 32x32: 4 blocks of width 64, 2 heads (about 0.2 M parameters), for tests."""
    args = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0}
    return _create_vision_transformer("vit_pico_patch4_32", pretrained=pretrained, **{**args, **kwargs})


@register_model
def vit_cifar_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny/4 for 32x32 images: 6 blocks of width 192, 3 heads, MLP ratio 2 (about 1.8 M parameters)."""
    args = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 2.0}
    return _create_vision_transformer("vit_cifar_tiny_patch4_32", pretrained=pretrained, **{**args, **kwargs})

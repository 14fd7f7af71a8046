"""The backbone's transforms: timm's ``create_transform`` from its data config, preceded by ``to_rgb``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from adaptkit.data.images import to_rgb

__all__ = ["ImageTransform", "build_transform"]

_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


class ImageTransform:
    """`to_rgb` followed by a timm transform; a class (not a closure) so DataLoader workers can pickle it."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(img))

    def __repr__(self) -> str:
        return f"ImageTransform({self.transform!r})"


def build_transform(
    data_config: dict, train: bool, augment: bool = True, crop_scale: tuple[float, float] | None = None
) -> Callable[[Image.Image], torch.Tensor]:
    """Build timm's transform for the backbone's data config, preceded by `to_rgb`.

    Args:
        data_config: timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode).
        train: random resized crop + horizontal flip when True (and `augment`), else resize + centre crop.
        augment: False gives the eval transform for training too.
        crop_scale: the random resized crop's area range (timm's default (0.08, 1.0) when None).

    Returns:
        A callable PIL image -> float tensor (C, H, W).
    """
    from timm.data import create_transform

    kwargs = {k: data_config[k] for k in _TRANSFORM_KEYS if k in data_config}
    if train and augment:
        scale = {"scale": tuple(crop_scale)} if crop_scale else {}
        tf = create_transform(**kwargs, is_training=True, hflip=0.5, color_jitter=None, **scale)
    else:
        tf = create_transform(**kwargs, is_training=False)
    return ImageTransform(tf)

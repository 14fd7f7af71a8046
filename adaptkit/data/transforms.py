"""The backbone's transforms: timm's ``create_transform`` from its data config, preceded by ``to_rgb``.

Training augmentation comes in named levels, mild by default, because the right amount depends on the data: a random
crop of 8 % of a digit or a letter no longer shows it, and a horizontal flip turns a "b" into a "d" (so flips are
opt-in at every level).

* ``none``: the eval transform (resize + centre crop).
* ``light`` (default): random resized crop of 60-100 % of the area, aspect 3/4-4/3.
* ``strong``: timm's ImageNet recipe: random resized crop of 8-100 % of the area and colour jitter 0.4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from adaptkit.data.images import to_rgb
from adaptkit.errors import ConfigError

__all__ = ["AUGMENT_LEVELS", "ImageTransform", "augment_level", "build_transform"]

_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# level -> timm create_transform(is_training=True) keyword arguments; "none" uses the eval transform
AUGMENT_LEVELS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "light": {"scale": (0.6, 1.0), "color_jitter": None},
    "strong": {"scale": (0.08, 1.0), "color_jitter": 0.4},
}


class ImageTransform:
    """`to_rgb` followed by a timm transform; a class (not a closure) so DataLoader workers can pickle it."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(img))

    def __repr__(self) -> str:
        return f"ImageTransform({self.transform!r})"


def augment_level(augment: str | bool) -> str:
    """The level name for ``augment``: a level, or a bool as older callers passed it (False: none, True: light).

    Raises:
        ConfigError: for an unknown level.
    """
    if isinstance(augment, bool):
        return "light" if augment else "none"
    level = str(augment).strip().lower()
    if level not in AUGMENT_LEVELS:
        raise ConfigError(f"unknown augmentation {augment!r}: use one of {', '.join(AUGMENT_LEVELS)}")
    return level


def build_transform(
    data_config: dict, train: bool, augment: str | bool = "light", crop_scale: tuple[float, float] | None = None,
    flip: bool = False,
) -> Callable[[Image.Image], torch.Tensor]:
    """Build timm's transform for the backbone's data config, preceded by `to_rgb`.

    Args:
        data_config: timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode).
        train: the training transform (augmented at level ``augment``) when True, else resize + centre crop.
        augment: ``none``, ``light`` or ``strong`` (see the module docstring); a bool as ``none``/``light``.
        crop_scale: overrides the level's random resized crop area range.
        flip: random horizontal flips (p=0.5) while training, at any level but ``none``.

    Returns:
        A callable PIL image -> float tensor (C, H, W).
    """
    from timm.data import create_transform

    kwargs = {k: data_config[k] for k in _TRANSFORM_KEYS if k in data_config}
    level = AUGMENT_LEVELS[augment_level(augment)]
    if train and level is not None:
        options = {**level, **({"scale": tuple(crop_scale)} if crop_scale else {})}
        tf = create_transform(**kwargs, is_training=True, hflip=0.5 if flip else 0.0, **options)
    else:
        tf = create_transform(**kwargs, is_training=False)
    return ImageTransform(tf)

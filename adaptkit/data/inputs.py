"""What the Python API takes as an image: a path, a PIL image, a numpy array of pixels, or a tensor already
transformed. Anything else is refused with a message that says what to pass."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from adaptkit.data.images import open_image, to_rgb
from adaptkit.errors import ImageError

__all__ = ["as_image_list", "array_to_image", "image_to_input"]

_KINDS = "a file path, a PIL image, a numpy array (H, W) or (H, W, 3|4), or a float tensor (3, H, W)"


def as_image_list(images: Any) -> list[Any]:
    """One image, or a list, tuple or (B, 3, H, W) tensor of them, as a list of images."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    if isinstance(images, torch.Tensor):
        return list(images) if images.dim() == 4 else [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ImageError("no images given: pass at least one image")
        return list(images)
    raise ImageError(f"images must be {_KINDS}, or a list of them; got {type(images).__name__}")


def array_to_image(a: np.ndarray) -> Image.Image:
    """Pixels as numpy -> a PIL image: uint8 as they are, floats in [0, 1] scaled to 0-255; (3, H, W) transposed."""
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # channels first -> last
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
        raise ImageError(f"a numpy image must have shape (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
            raise ImageError(f"a numpy image must hold numbers, got dtype {a.dtype}")
        if not np.isfinite(a).all():
            raise ImageError("a numpy image holds NaN or infinite values: give finite pixel values")
        scale = 255.0 if np.issubdtype(a.dtype, np.floating) and a.max(initial=0) <= 1.0 else 1.0
        a = np.clip(np.rint(a.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _check_tensor(t: torch.Tensor, input_size: tuple[int, ...]) -> torch.Tensor:
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if not t.is_floating_point():
        raise ImageError(f"a tensor image must be float and already transformed (normalised, {tuple(input_size)}), "
                         f"got dtype {t.dtype}: pass raw pixels as a PIL image or numpy array instead")
    if tuple(t.shape) != tuple(input_size):
        raise ImageError(f"a tensor image must have shape {tuple(input_size)} (the backbone's input), got "
                         f"{tuple(t.shape)}: pass a PIL image or numpy array to have it resized")
    if not torch.isfinite(t).all():
        raise ImageError("a tensor image holds NaN or infinite values")
    return t


def image_to_input(img: Any, transform: Callable[[Image.Image], torch.Tensor],
                   input_size: tuple[int, ...]) -> torch.Tensor:
    """One image of any accepted kind -> the backbone's (3, H, W) input tensor.

    Args:
        img: a path, a PIL image, a numpy array of pixels, or a tensor already transformed.
        transform: the backbone's eval transform (PIL image -> tensor).
        input_size: the backbone's ``(3, H, W)``, which a given tensor must have.

    Raises:
        ImageError: saying what was wrong with the image and what to pass instead.
    """
    if isinstance(img, torch.Tensor):
        return _check_tensor(img, input_size)
    if isinstance(img, (str, Path)):
        img = open_image(img)
    elif isinstance(img, np.ndarray):
        img = array_to_image(img)
    elif not isinstance(img, Image.Image):
        raise ImageError(f"an image must be {_KINDS}; got {'None' if img is None else type(img).__name__}")
    return transform(to_rgb(img))

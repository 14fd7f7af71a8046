"""Reading images: any file or PIL mode -> an 8-bit RGB image, with the decoding guarded against bad files."""

from __future__ import annotations

import logging
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from adaptkit.errors import ImageError

__all__ = ["IMG_EXTENSIONS", "MAX_SIDE", "open_image", "to_rgb"]

_log = logging.getLogger(__name__)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
MAX_SIDE = 2048  # larger images are downscaled before the model's own resize; it only costs time


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float grey image to 8 bits instead of clipping it."""
    a = np.asarray(img, dtype=np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
        a = a / 257.0  # 0..65535 -> 0..255
    elif lo < 0 or hi > 65535:
        a = (a - lo) / max(hi - lo, 1e-12) * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB; transparent parts are laid on white.

    Args:
        img: an image of any mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1, ...).

    Returns:
        An 'RGB' image of the same size.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _gray_to_8bit(img).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _check_regular_file(path: str | Path) -> None:
    """Refuse anything but a regular file before opening it: a named pipe or a device would block or never end."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ImageError(f"an image must be a file path, a PIL image or an array, got {path!r}")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except OSError as exc:
        raise ImageError(f"image {path} cannot be read ({exc.strerror}): check the path and its permissions") from None
    if stat.S_ISDIR(mode):
        raise ImageError(f"{path} is a folder, not an image: give the image files inside it")
    if not stat.S_ISREG(mode):
        raise ImageError(f"{path} is not a regular file (a pipe, socket or device): save the image to a file first")


def open_image(path: str | Path) -> Image.Image:
    """Read an image file as an 8-bit RGB image of at most :data:`MAX_SIDE` pixels a side (EXIF rotation applied).

    Raises:
        ImageError: the path is not a regular file, or the file is not an image, is truncated or corrupt, or is too
            large to decode safely.
    """
    _check_regular_file(path)
    try:
        with warnings.catch_warnings():  # the size is checked below, with a message that says what to do
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        if img.width * img.height > Image.MAX_IMAGE_PIXELS:
            img.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG decodes at a reduced scale; other formats stay as they are
            if img.width * img.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels")
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: the image is too large to decode safely ({exc}; the limit is "
                         f"{Image.MAX_IMAGE_PIXELS:,} pixels): downscale it and try again") from None
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image: use a PNG, JPEG, WebP, BMP, GIF or TIFF file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path} could not be decoded; the file looks truncated or corrupt ({exc})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to refuse the pixels
        _log.info("ignored unreadable EXIF orientation of %s", path)
    img = to_rgb(img)
    img.thumbnail((MAX_SIDE, MAX_SIDE))
    return img

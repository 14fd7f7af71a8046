"""The input size a backbone was built at, read from the data config recorded with it, without importing torch or
timm (``adaptkit list`` reads it for every task).

A backbone built at another size than its architecture's own (``--image-size``) records that own size beside timm's
keys, under :data:`OWN_SIZE_KEY`; a data config without it is at its own size (every backbone recorded before sizes
could be chosen is)."""

from __future__ import annotations

__all__ = ["OWN_SIZE_KEY", "other_image_size", "recorded_image_size", "sized_name"]

OWN_SIZE_KEY = "own_input_size"  # written by create_backbone only at another size than the architecture's own


def recorded_image_size(data_config: dict) -> int | None:
    """The input size a backbone was built at, from the data config recorded with it (None if it names none)."""
    size = data_config.get("input_size") if isinstance(data_config, dict) else None
    if isinstance(size, list | tuple) and size and isinstance(size[-1], int) and size[-1] == size[-2]:
        return int(size[-1])
    return None


def other_image_size(data_config: dict) -> int | None:
    """The input size recorded in ``data_config`` when it is not the architecture's own (None at its own size or when
    the data config names none): what tells two sizes of one backbone apart in a listing or a recipe."""
    size = recorded_image_size(data_config)
    own = data_config.get(OWN_SIZE_KEY) if isinstance(data_config, dict) else None
    return size if size is not None and isinstance(own, int) and own != size else None


def sized_name(name: str, data_config: dict, sep: str = "") -> str:
    """The backbone's name as listings show it: ``vit_small_patch14_dinov2.lvd142m@224px`` at another size than its
    own, the bare name at its own (``sep=" "``: a place a terminal's table may break the line)."""
    size = other_image_size(data_config)
    return name if size is None else f"{name}{sep}@{size}px"

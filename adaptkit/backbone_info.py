"""What a timm ViT is before its weights exist: class, patch, width, parameters, input size; and which input sizes
it may be built at.

:func:`describe_arch` builds the architecture on the ``meta`` device with timm's weight initialisation skipped (no
memory, no random draws: about a tenth of a second for a ViT-L), so the size checks of :func:`check_image_size` and
the ``adaptkit backbones`` table cost no real model. Only the classes of :func:`supported_classes` are adaptkit's
backbones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import timm
import torch
from torch.overrides import TorchFunctionMode

from adaptkit.errors import BackboneError, param
from adaptkit.families import FAMILIES
from adaptkit.sizes import other_image_size, recorded_image_size, sized_name  # noqa: F401 (re-exported)

__all__ = ["MAX_IMAGE_SIZE", "ArchInfo", "check_image_size", "default_input_size", "describe_arch", "hub_cached",
           "other_image_size", "packaged_weights", "pretrained_cfg", "recorded_image_size", "sized_name",
           "supported_classes"]

MAX_IMAGE_SIZE = 1024  # px: a ViT/14 at 1024 already runs 5,329 tokens, 21x the cost of 224 (attention: more)


def supported_classes() -> tuple[type, ...]:
    """The timm model classes adaptkit adapts (subclasses included): those :data:`adaptkit.families.FAMILIES`
    lists, found by name among ``timm.models``' exports."""
    return tuple(getattr(timm.models, name) for family in FAMILIES for name in family.classes
                 if isinstance(getattr(timm.models, name, None), type))


@dataclass(frozen=True)
class ArchInfo:
    """An architecture at its default input size, as timm builds it with ``num_classes=0``."""

    arch: str
    model_class: str
    supported: bool
    params: int
    width: int
    patch: int
    input_size: int  # the side of the square input the architecture is built for


class _SkipInit(TorchFunctionMode):
    """Turns the in-place initialisers (``uniform_``, ``trunc_normal_``, ``zero_`` ...) on meta tensors into no-ops:
    they have no values to fill, and timm's initialisation is most of the time a meta build takes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and args and getattr(args[0], "is_meta", False):
            return args[0]
        return func(*args, **(kwargs or {}))


def meta_model(arch: str, **kwargs: object) -> torch.nn.Module:
    """``timm.create_model(arch, num_classes=0, **kwargs)`` on the meta device: shapes only, no weights."""
    with torch.device("meta"), _SkipInit():
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


@functools.lru_cache(maxsize=512)
def describe_arch(name: str) -> ArchInfo:
    """Class, parameters, width, patch and default input size of a timm model name (a pretrained tag is ignored)."""
    arch = name.partition(".")[0]
    try:
        model = meta_model(arch)
    except Exception as exc:  # timm's builders raise anything from a bad name to a bad config
        raise BackboneError(f"could not build backbone {arch}: {exc}") from exc
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None) or (0,)
    grid_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = grid_size[-1] if grid_size else default_input_size(name)
    return ArchInfo(arch=arch, model_class=type(model).__name__, supported=isinstance(model, supported_classes()),
                    params=sum(p.numel() for p in model.parameters()), width=int(getattr(model, "num_features", 0)),
                    patch=int(patch[-1] if isinstance(patch, tuple | list) else patch), input_size=int(size))


def pretrained_cfg(name: str, registered_only: bool = False) -> object | None:
    """timm's pretrained config of ``name``, or None where timm has none (``registered_only``: no config made up
    for a tag timm does not register)."""
    try:
        return timm.models.get_pretrained_cfg(name, allow_unregistered=not registered_only)
    except RuntimeError:
        return None


def packaged_weights(cfg: object | None) -> bool:
    """Whether a pretrained config's weights ship inside a package (a file or a state dict: no hub, no network)."""
    return cfg is not None and bool(cfg.file or cfg.state_dict)


def default_input_size(name: str) -> int:
    """The side of the input that timm's pretrained config gives ``name`` (224 if it names none)."""
    cfg = pretrained_cfg(name)
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224


def check_image_size(name: str, image_size: object) -> int | None:
    """Check an input size for backbone ``name``; return it, or None when it is the backbone's own size.

    The size must be a whole number of patches, positive, at most :data:`MAX_IMAGE_SIZE`, and the architecture
    must accept timm's ``img_size``; anything else is a :class:`BackboneError` that says which sizes would do.
    """
    if image_size is None:
        return None
    size = check_size_value(image_size)
    if size == default_input_size(name):
        return None  # a registry's record of the default size: no model to describe
    info = describe_arch(name)
    if not info.supported:
        raise BackboneError(f"{info.arch} is a {info.model_class}, not a ViT adaptkit adapts, so it has no "
                            f"{param('image_size')} to change")
    if not info.patch or size % info.patch:
        near = max(info.patch, round(size / max(info.patch, 1)) * info.patch)
        raise BackboneError(f"{param('image_size', size)} is not a multiple of {info.arch}'s patch size "
                            f"{info.patch}: use {near}, for example")
    try:
        meta_model(info.arch, img_size=size)
    except Exception as exc:  # a model with no img_size argument, or one whose layout fixes it
        raise BackboneError(f"{info.arch} cannot be built at {size} px ({str(exc)[:160]}): leave "
                            f"{param('image_size')} out to use its own {default_input_size(name)} px") from exc
    return size


def check_size_value(image_size: object) -> int:
    """An input size as a number alone: a positive int of at most :data:`MAX_IMAGE_SIZE` px."""
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise BackboneError(f"{param('image_size')} must be a whole number of pixels, got {image_size!r}")
    if not 0 < image_size <= MAX_IMAGE_SIZE:
        raise BackboneError(f"{param('image_size', image_size)}: the input size must be between 1 and "
                            f"{MAX_IMAGE_SIZE} px")
    return image_size


def hub_cached(repo_id: str, filename: str | None) -> bool:
    """Whether the hub's file of these weights is in the local Hugging Face cache (looked up offline)."""
    from huggingface_hub import try_to_load_from_cache

    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, n), str) for n in names)

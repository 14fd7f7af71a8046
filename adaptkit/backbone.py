"""The frozen backbone: any timm Vision Transformer, built by name, with its weights' fingerprint.

Weights come from one of three places, and where they came from is recorded with the backbone:

* ``"hub"``: timm's pretrained weights (downloaded from the hub once, then read from its cache);
* ``"file:<path>"``: a local ``.safetensors`` file or torch checkpoint (read with ``weights_only=True``);
* ``"random"``: seeded random weights, only when asked for explicitly; the same bits on every machine
  (:mod:`adaptkit.random_weights`), so a registry trained on them keeps working after a move.

A backbone may be built at another input size than its own (``image_size``): timm builds it with ``img_size`` and
resamples the position embedding (or BEiT's relative position tables) of the weights it loads. A backbone is its
weights *at its input size*: at the architecture's own size the fingerprint is the hash of the weights alone, at any
other size it also covers the size, so two sizes are two backbones (two registry rows, two predictor hosts) even for
RoPE models whose tensors do not change with it. See ``docs/backbones.md``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from adaptkit.backbone_info import (
    check_image_size,
    check_size_value,
    default_input_size,
    hub_cached,
    packaged_weights,
    pretrained_cfg,
)
from adaptkit.devices import resolve_device
from adaptkit.errors import BackboneError, OfflineError, param
from adaptkit.hashing import tensors_sha256
from adaptkit.models import PACKAGED_BACKBONE
from adaptkit.random_weights import legacy_cache_file, recover_legacy, seeded_init
from adaptkit.sizes import OWN_SIZE_KEY, recorded_image_size
from adaptkit.suggest import closest

__all__ = ["DEFAULT_BACKBONE", "Backbone", "BackboneSpec", "create_backbone", "fingerprint", "recorded_image_size",
           "resolve_weights"]

_log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "vit_base_patch16_224.augreg_in21k"
RANDOM_SEED = 0  # random backbones are seeded so that "random" names one fixed set of weights
_HEAD_PREFIXES = ("head.",)  # task heads are adaptkit's; a checkpoint's own classifier is dropped


@dataclass
class Backbone:
    """A frozen timm ViT (``num_classes=0``: it returns pooled features) and what identifies it."""

    name: str
    model: nn.Module
    weights: str
    fingerprint: str
    data_config: dict = field(default_factory=dict)
    num_params: int = 0  # counted when built: tasks attached later add their own parameters to the model

    @property
    def embed_dim(self) -> int:
        return int(self.model.num_features)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        """The side of the square input it takes (its data config's ``input_size``)."""
        return int(self.data_config["input_size"][-1])

    @property
    def label(self) -> str:
        """Name plus weight source, e.g. ``vit_tiny_patch16_224 (random weights)``."""
        return self.name if self.weights in ("hub", "package") else f"{self.name} ({describe_weights(self.weights)})"


def describe_weights(weights: str) -> str:
    """A short human label for a weight source string."""
    if weights == "random":
        return "random weights"
    if weights.startswith("file:"):
        return f"weights from {weights[5:]}"
    return f"{weights} weights"


def fingerprint(model: nn.Module, image_size: int | None = None) -> str:
    """sha256 over every tensor of ``model.state_dict()`` (name, dtype, shape, bytes) in sorted name order; a model
    built at another input size than its architecture's own passes that ``image_size``, which the hash covers too."""
    state = model.state_dict()
    if image_size is not None:
        state = {**state, "adaptkit.image_size": torch.tensor([image_size, image_size])}
    return tensors_sha256(state)


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone to build: name, where its weights come from, and its input size (None: the architecture's own).

    What :func:`adaptkit.training.train` takes instead of a name when the size is not the default; checked when made,
    built by :meth:`build`.
    """

    name: str = DEFAULT_BACKBONE
    weights: str | os.PathLike | None = None
    pretrained: bool = True
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.image_size is not None:
            check_size_value(self.image_size)

    def build(self, device: str | torch.device = "cpu", expect: str | None = None) -> Backbone:
        return create_backbone(self.name, weights=self.weights, pretrained=self.pretrained, device=device,
                               expect=expect, image_size=self.image_size)


def resolve_weights(weights: str | os.PathLike | None, pretrained: bool) -> str:
    """Turn the user's choice into a weight source string: ``hub``, ``random`` or ``file:<absolute path>``."""
    if weights is not None:
        text = str(weights)
        if text in ("hub", "random", "package"):
            return text
        path = Path(text[5:] if text.startswith("file:") else text).expanduser()
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise BackboneError(f"weights file {path} {what}: pass the path of a .safetensors or .pth file")
        return f"file:{path.resolve()}"
    return "hub" if pretrained else "random"


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    expect: str | None = None,
    image_size: int | None = None,
) -> Backbone:
    """Build a frozen timm ViT by name.

    Args:
        name: a timm model name, optionally with a pretrained tag (``vit_base_patch16_224.augreg_in21k``).
        weights: a local weights file, or a source string from the registry (``hub``, ``random``, ``file:...``).
        pretrained: with no ``weights``, True loads timm's pretrained weights, False gives seeded random weights.
        device: where to put the model.
        expect: the fingerprint the weights must have (a registry's record); random weights of an older adaptkit
            are rebuilt to match it, any other mismatch is a :class:`BackboneError`.
        image_size: the side of the square input, if not the architecture's own: a whole number of patches, at
            most :data:`adaptkit.backbone_info.MAX_IMAGE_SIZE`; the weights' position embedding is resampled to it.

    Returns:
        The backbone in eval mode with every parameter frozen.
    """
    source = resolve_weights(weights, pretrained)
    device = resolve_device(device)  # a bad name fails here, before the model is built
    if source == "package":
        source = "hub"  # a packaged model's pretrained weights are a file timm already knows about
    _check_known(name)
    size = check_image_size(name, image_size)  # None at the architecture's own size
    if source == "random":
        with torch.random.fork_rng(devices=[]):  # timm's draws, overwritten below, leave the caller's RNG as it was
            model = seeded_init(_create(name, pretrained=False, size=size), RANDOM_SEED)
    elif source == "hub":
        source = _hub_or_package(name)
        model = _create(name, pretrained=True, size=size)
    else:
        model = _create(name, pretrained=False, size=size)
        load_weights_file(model, Path(source[5:]))
    if not hasattr(model, "blocks") or not hasattr(model, "forward_features"):
        raise BackboneError(f"{name} is not a Vision Transformer with `blocks`; pick a timm ViT such as "
                            "vit_base_patch16_224")
    found = fingerprint(model, size)
    if expect is not None and found != expect:
        _match(model, name, source if size is None else "resampled", found, expect)
    model.requires_grad_(False).eval().to(device)
    data_config = timm.data.resolve_data_config({"input_size": (3, size, size)} if size else {}, model=model)
    if size:  # the architecture's own size beside it, so that listings tell the sizes apart without timm
        data_config[OWN_SIZE_KEY] = default_input_size(name)
    return Backbone(name=name, model=model, weights=source, fingerprint=expect or found, data_config=data_config,
                    num_params=sum(p.numel() for p in model.parameters()))


def _match(model: nn.Module, name: str, source: str, found: str, expect: str) -> None:
    """Load the legacy random weights that hash to ``expect`` into ``model``, or say in one line why they differ."""
    if source == "random":
        state = recover_legacy(name, RANDOM_SEED, expect)
        if state is not None:
            model.load_state_dict(state)
            return
        cached = legacy_cache_file(expect)
        raise BackboneError(f"backbone {name} (random weights) rebuilds here as {found[:12]}, not the {expect[:12]} "
                            "its tasks were trained on, and no CPU path here gives adaptkit 0.1's random weights "
                            "either: export the tasks again from the registry that trained them, or retrain them "
                            f"(from adaptkit 0.1 on another machine: predict once there and copy {cached} here)")
    if source == "resampled":  # resampling is deterministic for given weights, timm and torch
        raise BackboneError(f"backbone {name} at another input size has fingerprint {found[:12]}, but its tasks were "
                            f"trained on {expect[:12]}: restore the original weights file, or the timm and torch "
                            "versions that resampled them")
    raise BackboneError(f"backbone {name} ({describe_weights(source)}) has fingerprint {found[:12]}, but its tasks "
                        f"were trained on {expect[:12]}: restore the original weights file")


def _check_known(name: str) -> None:
    """Refuse an unknown architecture or pretrained tag, naming the closest ones (the packaged backbone first)."""
    if not isinstance(name, str) or not name.strip():
        raise BackboneError(f"backbone must be a timm model name such as {PACKAGED_BACKBONE}, got {name!r}")
    arch, _, tag = name.partition(".")
    if timm.is_model(arch) and (not tag or _has_tag(name)):
        return
    close = closest(name, [PACKAGED_BACKBONE, *timm.list_pretrained("*vit*"), *timm.list_models("*vit*")])
    close.sort(key=lambda c: c != PACKAGED_BACKBONE)  # the weights that work offline before random ones
    hint = f": did you mean {', '.join(close)}?" if close else ": see `timm.list_models('vit*')`"
    what = f"{arch} has no weights tagged {tag!r}" if timm.is_model(arch) else f"unknown backbone {name!r}"
    offline = "" if PACKAGED_BACKBONE in close else f" ({PACKAGED_BACKBONE} ships with adaptkit and works offline)"
    raise BackboneError(f"{what}{hint}{offline}")


def _has_tag(name: str) -> bool:
    try:
        return timm.models.get_pretrained_cfg(name, allow_unregistered=False) is not None
    except RuntimeError:  # timm: "Invalid pretrained tag"
        return False


def _create(name: str, pretrained: bool, size: int | None = None) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **({"img_size": size} if size else {}))
    except (OSError, RuntimeError, ValueError) as exc:  # hub, file and config failures all surface here
        if pretrained and _looks_offline(exc):
            raise OfflineError(_offline_message(name)) from exc
        raise BackboneError(f"could not build backbone {name}: {exc}") from exc


def _hub_or_package(name: str) -> str:
    """Check that pretrained weights can be had without a long wait; return ``hub`` or ``package``."""
    cfg = pretrained_cfg(name, registered_only=True)
    if cfg is None or not (packaged_weights(cfg) or cfg.hf_hub_id or cfg.url):
        raise BackboneError(f"{name} has no pretrained weights in timm: give {param('weights')} or "
                            f"{param('pretrained', False)}")
    if packaged_weights(cfg):
        return "package"
    if cfg.hf_hub_id and hub_cached(cfg.hf_hub_id, cfg.hf_hub_filename):
        return "hub"
    if _offline_env() or not _hub_reachable():
        raise OfflineError(_offline_message(name))
    return "hub"


def _offline_env() -> bool:
    flags = (os.environ.get(k, "").lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub, so that an offline user hears in seconds instead of after retries."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _looks_offline(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(k in text for k in ("offline", "connection", "resolve", "network", "localentrynotfound", "timed out"))


def _offline_message(name: str) -> str:
    return (
        f"pretrained weights for {name} are not in the local cache and the model hub cannot be reached. "
        f"Offline, use {param('weights')} (a .safetensors or .pth checkpoint), a backbone that ships with adaptkit "
        f"(vit_cifar_tiny_patch4_32.adaptkit_c10), or {param('pretrained', False)} for random weights."
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file: safetensors, or a torch checkpoint with ``weights_only=True``."""
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and header errors all mean the same thing to the user
        raise BackboneError(f"could not read weights file {path}: {_load_failure(exc)}") from exc
    for key in ("state_dict", "model", "module", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors")
    for prefix in ("module.", "model.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_failure(exc: Exception) -> str:
    """One line for why a checkpoint could not be read; torch's "Weights only load failed" text runs to a page."""
    lines = [ln.strip().rstrip(".") for ln in str(exc).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        why = next((ln for ln in lines[1:] if "unsupported" in ln.lower()), "")
        why = why.split("error: ", 1)[-1].split(". ", 1)[0]  # "WeightsUnpickler error: Unsupported global: ..."
        if "global" in why.lower():
            return (f"it holds Python objects besides tensors, which adaptkit does not run ({why[:200]}); save the "
                    "weights as a state dict of tensors (safetensors, or torch.save(model.state_dict()))")
        lines = [why or "not a pickle torch can read"]
    return f"it is neither a safetensors file nor a torch checkpoint ({' '.join(lines)[:200]})"


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a checkpoint into ``model``, adapting it with timm's filter and dropping any classifier head."""
    if path.suffix == ".npz" and hasattr(model, "load_pretrained"):
        model.load_pretrained(str(path))  # original JAX/big_vision checkpoints
        return
    state = read_state_dict(path)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise BackboneError(f"{path} does not fit this backbone (shape mismatch): {str(exc)[:300]}") from exc
    missing = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
    if missing or unexpected:
        raise BackboneError(
            f"{path} does not fit this backbone: missing {missing[:4]}, unexpected {unexpected[:4]}. "
            f"Check {param('backbone')} names the architecture the file was saved from."
        )

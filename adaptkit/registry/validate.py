"""The complete check of an adapter file's contents, before a registry accepts it.

:meth:`AdapterMeta.check <adaptkit.artifacts.AdapterMeta.check>` covers the metadata's types and values; this adds
what needs the methods and timm: the method exists and its config is valid for it (through the method's own config
dataclass), the backbone is a model timm knows, and the tensors are exactly what the method builds on that backbone
for that many classes (names, shapes), finite and of a sane magnitude (:data:`MAX_ABS`). The expected tensors come
from attaching the method to the backbone built on the meta device (no memory, no weights, about 0.1 s for ViT-B,
cached), so every method, present or future, is checked by the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import timm
import torch

import adaptkit.models  # noqa: F401  (registers adaptkit's own small ViTs with timm)
from adaptkit.artifacts import ROUTING_PREFIX, AdapterMeta
from adaptkit.errors import AdaptkitError, ArtifactError
from adaptkit.methods import get_method

__all__ = ["check_adapter", "expected_shapes"]

# an adapter bigger than this many backbones is no adapter (``full`` is one backbone plus its head)
MAX_TRAINABLE_SHARE = 1.5
# a weight beyond this is no trained weight (ViTs' are below 100): its products overflow float32 logits
MAX_ABS = 1e4


def check_adapter(state: dict[str, torch.Tensor], meta: AdapterMeta, where: str) -> None:
    """Raise :class:`ArtifactError` naming the first thing wrong with an adapter's metadata or tensors.

    Args:
        state: the tensors by name (as read from the file).
        meta: the file's metadata.
        where: the file's name for the message.
    """
    meta.check(where)
    metrics = [k for k, x in meta.metrics.items() if x is not None and not math.isfinite(x)]
    if metrics:
        raise ArtifactError(f"{where}: metric {metrics[0]} is {meta.metrics[metrics[0]]} (training diverged?); "
                            "retrain it")
    _check_config(meta, where)
    try:
        expected = expected_shapes(meta.backbone, meta.method, json.dumps(meta.method_config, sort_keys=True),
                                   len(meta.classes))
    except ArtifactError as exc:
        raise ArtifactError(f"{where}: {exc}") from exc
    _check_routing(state, where)
    state = {k: v for k, v in state.items() if not k.startswith(ROUTING_PREFIX)}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{where}: its tensors are not those of {meta.method} on {meta.backbone} "
                            f"(missing {missing[:3]}, unexpected {extra[:3]}); re-export it from its registry")
    for name, shape in expected.items():
        t = state[name]
        if tuple(t.shape) != shape:
            what = "head" if name.startswith("head.") else "tensor"
            raise ArtifactError(f"{where}: {what} {name} has shape {tuple(t.shape)}, expected {shape} for "
                                f"{len(meta.classes)} classes on {meta.backbone}")
        if not t.is_floating_point():
            raise ArtifactError(f"{where}: tensor {name} is {t.dtype}, not floating point")
        if not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{where}: tensor {name} holds NaN or infinite values (training diverged?); "
                                "retrain it")
        if t.numel() and float(t.abs().max()) > MAX_ABS:
            raise ArtifactError(f"{where}: tensor {name} holds values up to {float(t.abs().max()):.3g}, beyond "
                                f"{MAX_ABS:g}: no trained weight comes near, and the logits would overflow; "
                                "retrain it")


def _check_routing(state: dict[str, torch.Tensor], where: str) -> None:
    """Routing statistics (``routing.*``) are no part of the method; they must still be finite numbers."""
    for name, t in state.items():
        if name.startswith(ROUTING_PREFIX) and (t.is_complex() or t.dtype == torch.bool
                                                or not bool(torch.isfinite(t).all())):
            raise ArtifactError(f"{where}: routing statistic {name} is not a finite real tensor; refit it with "
                                "`adaptkit routing fit`")


def _check_config(meta: AdapterMeta, where: str) -> None:
    try:
        config = get_method(meta.method, meta.method_config).config
    except (AdaptkitError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: bad method or method config ({exc})") from exc
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ArtifactError(f"{where}: {meta.method} setting {f.name}={value} is not finite")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ArtifactError(f"{where}: {meta.method} setting {f.name}={value} is negative")


@functools.lru_cache(maxsize=64)
def expected_shapes(backbone: str, method: str, config_json: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes ``method`` (with its config as JSON) builds on ``backbone`` for a head of
    ``num_classes``, found on the meta device."""
    if not timm.is_model(backbone):
        raise ArtifactError(f"backbone {backbone!r} is not a model timm knows (timm {timm.__version__}); "
                            "upgrade timm or import it where that model exists")
    try:
        with torch.device("meta"):  # every module built here, the method's too, allocates nothing
            trunk = timm.create_model(backbone, pretrained=False, num_classes=0)
            backbone_params = sum(p.numel() for p in trunk.parameters())
            task = get_method(method, json.loads(config_json)).attach(trunk, num_classes)
    except (AdaptkitError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"method {method} cannot be built on {backbone} ({exc})") from exc
    shapes = {k: tuple(t.shape) for k, t in task.state().items()}
    total = sum(math.prod(s) for s in shapes.values())
    if total > MAX_TRAINABLE_SHARE * backbone_params + trunk.num_features * num_classes + num_classes:
        raise ArtifactError(f"{method} with {json.loads(config_json)} would train {total:,} parameters, "
                            f"more than the backbone's {backbone_params:,}: its settings are out of range")
    return shapes

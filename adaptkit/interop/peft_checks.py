"""What a PEFT LoRA folder's config and head must be before adaptkit reads them: PEFT's config class takes any JSON
value for any field, so the fields adaptkit maps over are checked here, each with a one-line error."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import timm
import torch

from adaptkit.checks import check_float, check_int
from adaptkit.errors import ArtifactError, ConfigError

__all__ = ["MAX_JSON_BYTES", "check_backbone", "check_head", "check_json_size", "check_lora_fields", "check_rank"]

MAX_JSON_BYTES = 16 << 20  # adapter_config.json and adaptkit.json: a few kB, class names for 20k classes < 1 MiB


def check_json_size(path: Path) -> bool:
    """Refuse a JSON file of the folder larger than :data:`MAX_JSON_BYTES` before it is read (True otherwise)."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ArtifactError(f"{path} is {size:,} bytes, over the {MAX_JSON_BYTES >> 20} MiB such a file never "
                            "needs: it is not what save_pretrained or adaptkit export wrote")
    return True


def check_lora_fields(c: dict[str, Any], src: Path) -> None:
    """The LoRA settings adaptkit reads, of the types PEFT means (its config class takes any JSON value)."""
    where = f"{src}/adapter_config.json"
    try:
        check_int("r", c.get("r"), 1)
        check_float("lora_alpha", c.get("lora_alpha"), 0, low_open=True)
        check_float("lora_dropout", c.get("lora_dropout") or 0.0, 0, 1, high_open=True)
    except ConfigError as exc:
        raise ArtifactError(f"{where}: {exc}") from None
    for name in ("alpha_pattern", "rank_pattern"):
        if not isinstance(c.get(name) or {}, dict):
            raise ArtifactError(f"{where}: {name} must be a mapping of layer names to numbers, got "
                                f"{type(c.get(name)).__name__}")


def check_head(head: dict[str, torch.Tensor], src: Path) -> None:
    """The saved head is a classifier: a (classes, features) weight and a (classes,) bias."""
    weight, bias = head["head.weight"], head["head.bias"]
    if weight.dim() != 2 or bias.dim() != 1 or bias.shape[0] != weight.shape[0] or not weight.shape[0]:
        raise ArtifactError(f"{src}: the head is not a classifier (head.weight {tuple(weight.shape)}, head.bias "
                            f"{tuple(bias.shape)}; expected (classes, features) and (classes,)): save the adapter "
                            "again")


def check_rank(config: Any, rank: int, src: Path) -> None:
    """The tensors' rank is the one the config states (``r``, or a value of its ``rank_pattern``)."""
    if rank not in {config.r, *(config.rank_pattern or {}).values()}:
        raise ArtifactError(f"{src}: the LoRA tensors have rank {rank}, but adapter_config.json says r={config.r}: "
                            "the config does not belong to these weights; save the adapter again")


def _arch(name: str) -> str:
    return re.sub(r"\A(hf[-_]hub:)?timm/", "", name).partition(".")[0]


def check_backbone(named: Any, width: int, backbone: Any, src: Path) -> None:
    """The folder fits ``backbone``: the base model it names (when a timm model) is of the same architecture, and
    its head reads as many features as the backbone gives; else a "wrong backbone" error naming both."""
    named = named if isinstance(named, str) and named else None
    if named and timm.is_model(_arch(named)) and _arch(named) != _arch(backbone.name):
        raise ArtifactError(f"wrong backbone: {src} was trained on {named}, not {backbone.name}: pass the backbone it "
                            "was trained on (or none, to use the one it names)")
    if width != backbone.embed_dim:
        trained = f" ({named})" if named else ""
        raise ArtifactError(f"wrong backbone: {src}'s head reads {width} features, but {backbone.name} gives "
                            f"{backbone.embed_dim}: pass the backbone it was trained on{trained}")

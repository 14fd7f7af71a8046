"""A PEFT adapter folder as ``save_pretrained`` writes it, read and checked where it enters: ``adaptkit.json``,
``adapter_config.json`` and ``adapter_model.safetensors`` split into the head and the LoRA updates; and PEFT's names
for adaptkit's tensors. :mod:`adaptkit.interop.peft` maps what is read here onto an adaptkit LoRA task."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from adaptkit.errors import ArtifactError, ConfigError
from adaptkit.families import LINEARS
from adaptkit.interop.peft_checks import check_head, check_json_size, check_lora_fields
from adaptkit.metadata import given_fields_problem

__all__ = ["LAYERS", "PEFT_PREFIX", "SIDE_FILE", "peft_name", "read_config", "read_side_file", "read_tensors",
           "split_tensors"]

SIDE_FILE = "adaptkit.json"  # classes, backbone and data config beside the PEFT files
PEFT_PREFIX = "base_model.model."
LAYERS = sorted({p for candidates in LINEARS.values() for paths in candidates for p in paths})  # every family's
_LORA_KEY = re.compile(rf"blocks\.(\d+)\.({'|'.join(map(re.escape, LAYERS))})\.lora_([AB])\.weight")
_HEAD_KEYS = ("head.weight", "head.bias")


def peft_name(name: str) -> str:
    """adaptkit's ``blocks.0.attn.qkv.lora.lora_A`` -> PEFT's ``blocks.0.attn.qkv.lora_A.weight``."""
    return name if name.startswith("head.") else name.replace(".lora.lora_", ".lora_") + ".weight"


def read_side_file(src: Path) -> dict[str, Any]:
    """``adaptkit.json`` of the folder (an empty dict when there is none), its given fields checked."""
    if not src.is_dir():
        raise ArtifactError(f"{src} {'is not a folder' if src.exists() else 'does not exist'}: give the folder a "
                            "PEFT save_pretrained wrote")
    path = src / SIDE_FILE
    try:
        side = json.loads(path.read_text()) if path.is_file() and check_json_size(path) else {}
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested deeper than json can read
        raise ArtifactError(f"{path} is not readable JSON ({str(exc)[:200]}): fix or delete it") from None
    side = side if isinstance(side, dict) else {}
    problem = given_fields_problem(side)
    if problem:
        raise ArtifactError(f"{path}: {problem}: fix or delete it (its values are read at import only)")
    return side


def read_config(peft: Any, src: Path) -> Any:
    """``adapter_config.json`` as PEFT reads it, refused in one line where it has no adaptkit LoRA form."""
    if not (src / "adapter_config.json").is_file():
        raise ArtifactError(f"{src} has no adapter_config.json: give the folder a PEFT save_pretrained wrote")
    check_json_size(src / "adapter_config.json")
    try:
        config = peft.PeftConfig.from_pretrained(str(src))
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ArtifactError(f"{src}/adapter_config.json is not a PEFT config PEFT can read ({first})") from exc
    c, kind = vars(config), str(getattr(config, "peft_type", "?")).rpartition(".")[2]
    if kind == "LORA":
        check_lora_fields(c, src)
    problems = [
        (kind != "LORA", f"is a {kind} adapter: only LoRA maps onto adaptkit"),
        (c.get("use_dora"), "uses DoRA, whose magnitude vector adaptkit's LoRA lacks: retrain with use_dora=False"),
        (c.get("bias", "none") != "none",
         f"trains biases (bias={c.get('bias')!r}), which adaptkit keeps frozen: retrain with bias='none'"),
        (c.get("lora_bias"), "trains a bias on lora_B (lora_bias=True): retrain without it"),
        (c.get("layer_replication"), "replicates layers (layer_replication): adaptkit's backbone keeps its blocks"),
        (c.get("target_parameters"), "adapts parameters (target_parameters), not layers: target the blocks' "
                                     "qkv/proj/fc1/fc2 instead"),
        (any(a != c.get("lora_alpha") for a in (c.get("alpha_pattern") or {}).values()),
         "gives layers different alphas (alpha_pattern): adaptkit's LoRA has one alpha; retrain without it"),
    ]
    problem = next((text for bad, text in problems if bad), None)
    if problem:
        raise ConfigError(f"{src} {problem}")
    return config


def read_tensors(src: Path) -> dict[str, torch.Tensor]:
    """``adapter_model.safetensors``'s tensors, floating ones as float32."""
    path = src / "adapter_model.safetensors"
    if not path.is_file():
        if (src / "adapter_model.bin").is_file():
            raise ArtifactError(f"{src} holds adapter_model.bin, a pickle adaptkit does not load: re-save it with "
                                "save_pretrained(..., safe_serialization=True)")
        raise ArtifactError(f"{src} has no adapter_model.safetensors: give the folder a PEFT save_pretrained wrote")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file ({exc}): save the adapter again") from exc
    return {k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}  # check_adapter refuses ints


def split_tensors(tensors: dict[str, torch.Tensor], src: Path) -> tuple[dict, dict]:
    """PEFT's tensors as the head (``head.weight``, ``head.bias``) and the updates by (block, layer path)."""
    head: dict[str, torch.Tensor] = {}
    updates: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in sorted(tensors.items()):
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = _LORA_KEY.fullmatch(name)
        if match:
            updates.setdefault((int(match[1]), match[2]), {})[match[3]] = t
        elif name in _HEAD_KEYS:
            head[name] = t
        elif "lora_magnitude_vector" in name:
            raise ConfigError(f"{src} uses DoRA ({name}), whose magnitude vector adaptkit's LoRA lacks: retrain "
                              "with use_dora=False")
        elif ".lora_" in name:
            raise ConfigError(f"{src} adapts {name.split('.lora_')[0]}, which adaptkit's LoRA cannot: it adapts "
                              f"the blocks' {', '.join(LAYERS)} (a regex target_modules such as "
                              r"'blocks\.\d+\.attn\.proj' keeps patch_embed.proj out)")
        else:
            raise ConfigError(f"{src} saves {name}, which is neither a LoRA update nor the head: adaptkit keeps the "
                              "rest of the backbone frozen; retrain with modules_to_save=['head'] only")
    if "head.weight" not in head or "head.bias" not in head:
        raise ConfigError(f"the adapter saves no head: {src} needs the classifier, saved by training with "
                          "modules_to_save=['head'] on timm.create_model(..., num_classes=N)")
    check_head(head, src)
    half = next((f"blocks.{i}.{p}" for (i, p), pair in updates.items() if len(pair) != 2), None)
    if half or not updates:
        what = f"{half} has lora_A or lora_B alone" if half else "holds no LoRA update"
        raise ArtifactError(f"{src}: {what}: save the adapter again")
    return head, updates

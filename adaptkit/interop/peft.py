"""PEFT adapter folders of LoRA tasks: write one that ``peft.PeftModel.from_pretrained`` loads onto the timm model
(:func:`export_peft`), or register one trained on a timm ViT with PEFT elsewhere as an adaptkit task
(:func:`import_peft`).

adaptkit's LoRA is PEFT's LoRA on the blocks' ``attn.qkv`` (or Eva's ``attn.q_proj / k_proj / v_proj``),
``attn.proj``, ``mlp.fc1`` (SwiGLU's ``fc1_g / fc1_x``) and ``mlp.fc2``, as :data:`adaptkit.families.LINEARS` names
them (``W x + alpha / r * B A x``, biases frozen), its head PEFT's ``modules_to_save=["head"]``; no other method has
a faithful PEFT form (:data:`NO_PEFT_FORM` says why). A fused ``qkv`` whose attention adds its own q/v bias (Eva's,
BEiT's ``q_bias``) is read as ``qkv.weight`` around PEFT's layer, so LoRA there has no PEFT form either.

The base model a PEFT folder goes on is ``timm.create_model(BACKBONE, num_classes=N)`` holding the *same frozen
weights* as adaptkit's backbone: ``pretrained=True`` for hub weights; otherwise load
``adaptkit.backbone.create_backbone(BACKBONE, weights=...).model.state_dict()`` into it (``strict=False``: only
``head.*`` is missing). ``adaptkit.json`` beside the adapter says which, with the classes and the data config.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import timm
import torch

import adaptkit
from adaptkit.artifacts import ROUTING_PREFIX, WEIGHT_SOURCES, AdapterMeta, check_task_name
from adaptkit.backbone import Backbone, create_backbone, recorded_image_size
from adaptkit.errors import ArtifactError, ConfigError, param
from adaptkit.families import LINEARS, family_of, linear_paths, outside_bias
from adaptkit.interop.peft_checks import check_backbone, check_rank
from adaptkit.interop.peft_folder import (
    PEFT_PREFIX,
    SIDE_FILE,
    peft_name,
    read_config,
    read_side_file,
    read_tensors,
    split_tensors,
)
from adaptkit.methods import LoraConfig, LoraMethod, get_method
from adaptkit.registry import Registry, VersionRow
from adaptkit.tempfiles import folder_beside

__all__ = ["export_peft", "import_peft", "PEFT_EXTRA", "NO_PEFT_FORM", "SIDE_FILE"]

PEFT_EXTRA = "PEFT export needs the peft extra: pip install 'adaptkit[peft]'"
NO_PEFT_FORM = {  # why a method cannot be written as a PEFT adapter
    "linear": "a linear probe adapts no layer and PEFT needs at least one",
    "full": "full fine-tuning changes every weight: it is a whole model, not a PEFT adapter",
    "adapter": "PEFT has no bottleneck adapter (a residual path beside a block) for timm ViTs",
    "ssf": "SSF scales and shifts features; PEFT's nearest (IA3) scales only",
    "bitfit": "PEFT has no bias-only method (its bias='all' trains biases beside a LoRA, on the shared weights)",
    "vpt": "PEFT's prompt tuning works on language models' token embeddings, not a ViT's sequence",
}


def export_peft(registry: Registry | str | None, ref: str, dest_dir: str | os.PathLike, *,
                overwrite: bool = False) -> Path:
    """Write a LoRA task as a PEFT adapter folder: ``adapter_config.json``, ``adapter_model.safetensors`` (the LoRA
    updates and the head, as ``modules_to_save``), PEFT's ``README.md`` and adaptkit's ``adaptkit.json``.

    Load it with ``PeftModel.from_pretrained(base, dest_dir)``, ``base`` being the timm model with the backbone's
    weights (see the module's docstring): its logits are adaptkit's.

    Args:
        registry: a :class:`Registry` or its URL (None: the default registry).
        ref: the version, ``task`` (its default) or ``task@N``.
        dest_dir: the folder to write; it may exist if empty, its parent must exist.
        overwrite: write into a folder that holds files already (files of the same names are replaced).

    Returns:
        The folder written.

    Raises:
        ConfigError: the peft extra is missing, the task's method has no PEFT form, or ``dest_dir`` is not
            usable. A broken or unknown version raises the registry's own error.
    """
    peft = _need_peft()
    registry = registry if isinstance(registry, Registry) else Registry(registry)
    row = registry.get_version(ref)
    if row.method != "lora":
        reason = NO_PEFT_FORM.get(row.method, "PEFT has no such method")
        raise ConfigError(f"{row.ref} is a {row.method} task, which has no PEFT form ({reason}): export it with "
                          "--format adaptkit or --format onnx")
    dest = _check_dest_dir(dest_dir, overwrite)
    state, meta = registry.load_version(row)
    method = get_method(meta.method, meta.method_config)
    with torch.random.fork_rng(devices=[]):  # timm's initialisation (never saved) leaves the caller's RNG alone
        model = timm.create_model(meta.backbone, pretrained=False, num_classes=len(meta.classes))
    if family_of(model).other_head:
        raise ConfigError(f"{row.ref} is on {meta.backbone}, whose timm model is not the backbone plus one head "
                          f"({family_of(model).other_head}), so a PEFT folder on it would not give this task's "
                          "logits: export it with --format adaptkit or --format onnx")
    indices = list(method.block_indices(model))
    layers = [p for t in method.config.targets for p in linear_paths(model.blocks[indices[0]], t)]
    bypassed = next((p for p in layers if outside_bias(model, f"blocks.{indices[0]}.{p}")), None)
    if bypassed:
        raise ConfigError(f"{row.ref} adapts {bypassed}, whose attention adds its q/v bias itself and reads "
                          f"{bypassed}.weight directly, around PEFT's LoRA layer: PEFT cannot express it; export "
                          "it with --format adaptkit or --format onnx")
    blocks = "|".join(str(i) for i in indices)
    paths = "|".join(re.escape(p) for p in layers)
    config = peft.LoraConfig(r=method.config.rank, lora_alpha=method.config.alpha, lora_dropout=method.config.dropout,
                             target_modules=rf"blocks\.({blocks})\.({paths})", modules_to_save=["head"], bias="none")
    model = peft.get_peft_model(model, config)
    model.peft_config["default"].base_model_name_or_path = meta.backbone
    tensors = {PEFT_PREFIX + peft_name(k): t for k, t in state.items() if not k.startswith(ROUTING_PREFIX)}
    result = peft.set_peft_model_state_dict(model, tensors)
    if result.unexpected_keys:
        raise ConfigError(f"{row.ref}: PEFT's model has no place for {result.unexpected_keys[0]}: re-export it "
                          "with --format adaptkit")
    try:
        with folder_beside(dest) as tmp:  # written whole, then moved in (never half an export)
            model.save_pretrained(str(tmp), save_embedding_layers=False)  # False: no hub look-up of the base
            (tmp / SIDE_FILE).write_text(json.dumps(_side_info(row, meta), indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    return dest


def import_peft(registry: Registry | str | None, src_dir: str | os.PathLike, *, task: str | None = None,
                classes: list[str] | str | None = None, labels_file: str | os.PathLike | None = None,
                backbone: Backbone | str | None = None) -> VersionRow:
    """Register a PEFT LoRA adapter folder, trained on a timm ViT, as the next version of an adaptkit LoRA task.

    Any rank and alpha map over (``use_rslora``'s ``alpha / sqrt(r)`` becomes adaptkit's ``alpha / r`` with
    ``alpha * sqrt(r)``); the head must be in the folder (``modules_to_save=["head"]``).

    Args:
        registry: a :class:`Registry` or its URL (None: the default registry).
        src_dir: the folder ``save_pretrained`` wrote (``adapter_config.json``, ``adapter_model.safetensors``).
        task: the task's name (default: the folder's name).
        classes: the class names in head order, a list or ``"cat,dog"``; else ``labels_file`` (one per line),
            else the folder's ``adaptkit.json``.
        backbone: an adaptkit :class:`Backbone` or a timm name (hub weights) with the adapter's base weights;
            default: ``adaptkit.json``'s backbone, else ``base_model_name_or_path`` of the config.

    Returns:
        The new version's row (``train`` records ``imported_from`` and ``format: peft``).

    Raises:
        ConfigError: the peft extra is missing, or the adapter has no faithful adaptkit form (DoRA, trained biases,
            per-layer ranks or alphas, other layers, some blocks but not the last N): the message says what to do.
        ArtifactError: the folder is incomplete or unreadable, or does not fit the backbone or the classes.
    """
    peft = _need_peft("import")
    registry = registry if isinstance(registry, Registry) else Registry(registry)
    src = Path(src_dir).expanduser()
    side = read_side_file(src)
    config = read_config(peft, src)
    tensors = read_tensors(src)
    name = src.resolve().name if task is None else task
    check_task_name(name)
    head, updates = split_tensors(tensors, src)
    labels = _class_names(classes, labels_file, side, head["head.weight"].shape[0], src)
    backbone = _backbone(backbone, side, config, src, registry)
    if side.get("backbone_fingerprint", backbone.fingerprint) != backbone.fingerprint:
        raise ArtifactError(f"{src} was exported from a backbone with fingerprint {side['backbone_fingerprint'][:12]}"
                            f", not this one ({backbone.fingerprint[:12]}): pass the backbone it was trained on "
                            f"({param('backbone')} with {param('weights')} for a weights file or "
                            f"{param('pretrained', False)} for random ones)")
    check_backbone(side.get("backbone") or getattr(config, "base_model_name_or_path", None),
                   head["head.weight"].shape[1], backbone, src)
    method = _lora_method(config, updates, backbone, src)
    state = {f"blocks.{i}.{path}.lora.lora_{ab}": t for (i, path), pair in updates.items() for ab, t in pair.items()}
    meta = AdapterMeta(task=name, classes=labels, method="lora", method_config=method.config_dict(),
                       backbone=backbone.name, backbone_weights=backbone.weights,
                       backbone_fingerprint=backbone.fingerprint, backbone_params=backbone.num_params,
                       backbone_dim=backbone.embed_dim, data_config=backbone.data_config,
                       dataset=str(side.get("dataset", "")))
    from adaptkit.registry.validate import check_adapter

    check_adapter({**state, **head}, meta, str(src))
    registry.check_new(meta, {**state, **head}, str(src))
    return registry.add_version(meta, {**state, **head},
                                train_info={"imported_from": str(src.resolve()), "format": "peft"})


# -- helpers ---------------------------------------------------------------------------------------------------


def _need_peft(job: str = "export") -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ConfigError(PEFT_EXTRA.replace("export", job)) from exc
    return peft


def _check_dest_dir(dest: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(dest).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is not a folder: PEFT adapters are folders; pick another path")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot export to {path}: folder {path.parent} does not exist: create it first or export "
                          "somewhere else")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"{path} exists and is not empty: pick another folder or pass {param('overwrite', True)} to "
                          "write into it")
    return path


def _side_info(row: VersionRow, meta: AdapterMeta) -> dict[str, Any]:
    weights = meta.backbone_weights
    base = (f"timm.create_model({meta.backbone!r}, pretrained=True, num_classes={len(meta.classes)})"
            if weights in ("hub", "package") else
            f"timm.create_model({meta.backbone!r}, num_classes={len(meta.classes)}) with the state_dict of "
            f"adaptkit.backbone.create_backbone({meta.backbone!r}, weights={weights!r}).model (strict=False)")
    return {"format": "adaptkit.peft", "adaptkit_version": adaptkit.__version__, "task": row.ref,
            "classes": meta.classes, "method": meta.method, "method_config": meta.method_config,
            "backbone": meta.backbone, "backbone_weights": weights, "backbone_fingerprint": meta.backbone_fingerprint,
            "data_config": meta.data_config, "dataset": meta.dataset, "base_model": base}


def _class_names(classes: list[str] | str | None, labels_file: str | os.PathLike | None, side: dict[str, Any],
                 count: int, src: Path) -> list[str]:
    if classes is not None and labels_file is not None:
        raise ConfigError("give classes or labels_file, not both")
    if classes is not None:
        names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else [str(c) for c in classes]
    elif labels_file is not None:
        try:
            names = [line.strip() for line in Path(labels_file).expanduser().read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise ConfigError(f"cannot read labels_file {labels_file} ({exc.strerror}): give a text file with one "
                              "class name per line") from exc
    elif isinstance(side.get("classes"), list):
        names = [str(c) for c in side["classes"]]
    else:
        raise ConfigError(f"{src} does not name its classes: pass classes= (names in head order) or labels_file= "
                          "(one per line)")
    if len(names) != count:
        raise ArtifactError(f"{len(names)} class names for a head of {count} outputs in {src}: give {count} names, "
                            "in head order")
    return names


def _backbone(given: Backbone | str | None, side: dict[str, Any], config: Any, src: Path,
              registry: Registry) -> Backbone:
    """The backbone the adapter was trained on: the argument, else adaptkit.json's, else the config's base model.

    adaptkit.json's fingerprint is the file's word: it is compared with the backbone built, and only a fingerprint
    this registry records already may rebuild legacy random weights to match it (minutes, in child processes).
    """
    if isinstance(given, Backbone):
        return given
    if given is not None:
        return create_backbone(str(given))
    if isinstance(side.get("backbone"), str) and side.get("backbone_weights") in WEIGHT_SOURCES:
        expect = side.get("backbone_fingerprint")
        return create_backbone(side["backbone"], weights=side["backbone_weights"],
                               expect=expect if expect and registry.known_backbone(expect) else None,
                               image_size=recorded_image_size(side.get("data_config") or {}))
    name = getattr(config, "base_model_name_or_path", None)
    if not name:
        raise ConfigError(f"{src}/adapter_config.json names no base model: pass backbone= (an adaptkit Backbone or "
                          "a timm model name)")
    return create_backbone(re.sub(r"\A(hf[-_]hub:)?timm/", "", str(name)))


def _lora_method(config: Any, updates: dict[tuple[int, str], dict], backbone: Backbone, src: Path) -> LoraMethod:
    """adaptkit's LoRA with the adapter's rank, effective alpha, targets and blocks, or an error saying why not."""
    depth = len(backbone.model.blocks)
    if max(i for i, _ in updates) >= depth:
        raise ArtifactError(f"{src} adapts block {max(i for i, _ in updates)}, but {backbone.name} has {depth} "
                            "blocks: pass the backbone it was trained on")
    ranks = sorted({pair["A"].shape[0] for pair in updates.values()})
    if len(ranks) > 1:
        raise ConfigError(f"{src} has LoRA ranks {ranks} in different layers (rank_pattern): adaptkit's LoRA has "
                          "one rank; retrain without rank_pattern")
    blocks = sorted({i for i, _ in updates})
    paths = {p for _, p in updates}
    if set(updates) != {(i, p) for i in blocks for p in paths}:
        raise ConfigError(f"{src} adapts different layers in different blocks: adaptkit's LoRA adapts the same "
                          "layers in each block it adapts")
    if blocks != list(range(depth - len(blocks), depth)):
        raise ConfigError(f"{src} adapts blocks {blocks} of {depth}: adaptkit's LoRA adapts every block or the last "
                          "N (layers_to_transform must be the last blocks)")
    rank, alpha = ranks[0], float(config.lora_alpha)
    check_rank(config, rank, src)
    alpha = alpha * math.sqrt(rank) if getattr(config, "use_rslora", False) else alpha  # alpha/sqrt(r) == alpha'/r
    targets = tuple(t for t, candidates in LINEARS.items() if any(set(c) & paths for c in candidates))
    lora = LoraConfig(rank=rank, alpha=alpha, targets=targets, dropout=float(config.lora_dropout or 0.0))
    return LoraMethod(lora, blocks=None if len(blocks) == depth else len(blocks))

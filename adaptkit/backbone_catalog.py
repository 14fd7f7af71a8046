"""The pretrained backbones to pick from: adaptkit's recommended list by family, or every timm ViT it adapts.

Only the names in :data:`RECOMMENDED` are ours; everything shown about them comes from timm: input size and licence
from its pretrained configs, parameters and embedding width from the architecture built on the meta device
(:func:`adaptkit.backbone_info.describe_arch`), and whether the weights are already on this machine from the local
Hugging Face cache, looked up offline. Each architecture is described once per timm and adaptkit version and kept in
adaptkit's cache; ``every=True`` describes a few hundred the first time (about half a minute on a busy 2-core CPU).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import timm

import adaptkit
from adaptkit.backbone import DEFAULT_BACKBONE
from adaptkit.backbone_info import ArchInfo, describe_arch, hub_cached, packaged_weights, supported_classes
from adaptkit.errors import BackboneError
from adaptkit.models import PACKAGED_BACKBONE
from adaptkit.random_weights import cache_dir

__all__ = ["RECOMMENDED", "CatalogEntry", "catalog"]

#: family -> the pretrained tags adaptkit suggests for it, smallest first (see docs/backbones.md for what each is for)
RECOMMENDED: dict[str, tuple[str, ...]] = {
    "ViT in21k": (DEFAULT_BACKBONE, "vit_small_patch16_224.augreg_in21k"),
    "DINOv2": ("vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_reg4_dinov2.lvd142m",
               "vit_base_patch14_dinov2.lvd142m", "vit_base_patch14_reg4_dinov2.lvd142m"),
    "DINOv3": ("vit_small_patch16_dinov3.lvd1689m", "vit_base_patch16_dinov3.lvd1689m"),
    "SigLIP": ("vit_base_patch16_siglip_224.webli",),
    "SigLIP 2": ("vit_base_patch16_siglip_224.v2_webli",),
    "CLIP": ("vit_base_patch16_clip_224.openai", "vit_base_patch16_clip_224.laion2b"),
    "EVA02": ("eva02_small_patch14_224.mim_in22k", "eva02_base_patch14_224.mim_in22k"),
    "PE core": ("vit_pe_core_small_patch16_384.fb", "vit_pe_core_base_patch16_224.fb"),
    "BEiT": ("beitv2_base_patch16_224.in1k_ft_in22k", "beit_base_patch16_224.in22k_ft_in22k"),
    "packaged": (PACKAGED_BACKBONE,),
}


@dataclass(frozen=True)
class CatalogEntry:
    """One pretrained backbone as the table shows it."""

    name: str  # timm name with its pretrained tag
    family: str  # the family of RECOMMENDED, or the model class with every=True
    input_size: int  # the side of the input its pretrained config gives
    params: int  # with num_classes=0: the frozen backbone adaptkit keeps
    width: int  # the embedding width a task's head reads
    license: str | None  # as timm's pretrained config names it
    cached: bool  # the weights are on this machine (package or local Hugging Face cache)
    default: bool  # adaptkit's default backbone


def catalog(every: bool = False) -> list[CatalogEntry]:
    """The recommended backbones by family; ``every``: each pretrained tag of every timm ViT adaptkit adapts."""
    if not every:
        known = _described([n.partition(".")[0] for names in RECOMMENDED.values() for n in names])
        return [_entry(n, family, known.get(n.partition(".")[0]) or describe_arch(n))  # describe_arch: why it fails
                for family, names in RECOMMENDED.items() for n in names]
    archs = _every_arch()
    names = [n for n in timm.list_pretrained() if n.partition(".")[0] in archs]
    return [_entry(n, archs[n.partition(".")[0]].model_class, archs[n.partition(".")[0]]) for n in sorted(names)]


def _entry(name: str, family: str, info: ArchInfo) -> CatalogEntry:
    cfg = timm.models.get_pretrained_cfg(name)
    size = int(cfg.input_size[-1]) if cfg and cfg.input_size else info.input_size
    return CatalogEntry(name=name, family=family, input_size=size, params=info.params, width=info.width,
                        license=getattr(cfg, "license", None), cached=_cached(cfg), default=name == DEFAULT_BACKBONE)


def _cached(cfg: object) -> bool:
    """Whether the weights of a pretrained config are on this machine, without asking the network."""
    if cfg is None:
        return False
    if packaged_weights(cfg):
        return cfg.state_dict is not None or Path(cfg.file).is_file()
    return bool(cfg.hf_hub_id) and hub_cached(cfg.hf_hub_id, cfg.hf_hub_filename)


def _candidate_modules() -> set[str]:
    """timm's model modules that define a supported class or a subclass of one (DeiT's distilled ViT)."""
    found, todo = set(), list(supported_classes())
    while todo:
        cls = todo.pop()
        found.add(cls.__module__.rpartition(".")[2])
        todo.extend(cls.__subclasses__())
    return found


def _every_arch() -> dict[str, ArchInfo]:
    """Every pretrained architecture of a supported class."""
    tags = (t for m in _candidate_modules() for t in timm.list_models(module=m, pretrained=True))
    known = _described(sorted({t.partition(".")[0] for t in tags}))
    return {a: info for a, info in known.items() if info.supported}


def _described(archs: list[str]) -> dict[str, ArchInfo]:
    """``archs`` described (those timm cannot build here left out), each once per timm and adaptkit version: what
    was found is kept in adaptkit's cache."""
    path = cache_dir() / f"backbone-archs-timm-{timm.__version__}-adaptkit-{adaptkit.__version__}.json"
    try:
        known = {a: ArchInfo(**v) for a, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, TypeError):
        known = {}
    missing = [a for a in archs if a not in known]
    for arch in missing:
        try:
            known[arch] = describe_arch(arch)
        except BackboneError:  # an architecture timm cannot build here is not offered
            continue
    if missing:
        _write(path, {a: asdict(v) for a, v in known.items()})
    return {a: known[a] for a in archs if a in known}


def _write(path: Path, data: dict) -> None:
    """Write the cache atomically; a cache that cannot be written is only slower next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass

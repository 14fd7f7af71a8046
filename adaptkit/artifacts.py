"""Adapter files: one ``.safetensors`` per adapter version, holding only the task's tensors and head.

The file's metadata (strings, as safetensors requires) make it self-describing, so it can be loaded, exported and
imported with no outside knowledge. ``tensors_sha256`` covers the tensors, so a file checks itself even where no
registry recorded its hash; the registry also records the sha256 of the whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save

from adaptkit.errors import ArtifactError
from adaptkit.hashing import tensors_sha256

__all__ = ["FORMAT_VERSION", "AdapterMeta", "save_adapter", "load_adapter", "read_meta", "file_sha256",
           "tensors_sha256"]

FORMAT_VERSION = "1"
FORMAT_NAME = "adaptkit.adapter"
_ADDED_LATER = ("recipe",)  # metadata fields that format version 1 files may lack (they take their defaults)


@dataclass
class AdapterMeta:
    """What an adapter file says about itself."""

    task: str
    classes: list[str]
    method: str
    method_config: dict[str, Any]
    backbone: str
    backbone_weights: str
    backbone_fingerprint: str
    backbone_params: int
    backbone_dim: int
    data_config: dict[str, Any]
    dataset: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: str = FORMAT_VERSION
    recipe: dict[str, Any] = field(default_factory=dict)  # how it was trained; absent from files written before it

    def __post_init__(self) -> None:
        for name in ("classes", "method_config", "data_config", "metrics", "recipe"):  # as they read back from JSON
            setattr(self, name, json.loads(json.dumps(getattr(self, name))))

    def to_strings(self, tensors_hash: str) -> dict[str, str]:
        out = {k: v if isinstance(v, str) else json.dumps(v) for k, v in asdict(self).items()}
        out.update(format=FORMAT_NAME, tensors_sha256=tensors_hash)
        return out

    @classmethod
    def from_strings(cls, meta: dict[str, str], where: str) -> AdapterMeta:
        if meta.get("format") != FORMAT_NAME:
            raise ArtifactError(f"{where} is not an adaptkit adapter file (no adaptkit metadata)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{where} has format version {meta.get('format_version')}, this adaptkit reads "
                                f"{FORMAT_VERSION}: upgrade adaptkit or re-export the adapter")
        values: dict[str, Any] = {}
        try:
            for name, f in cls.__dataclass_fields__.items():
                if name in _ADDED_LATER and name not in meta:
                    continue
                raw = meta[name]
                values[name] = raw if f.type in ("str", str) else json.loads(raw)
        except (KeyError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{where} has damaged metadata ({exc}); re-export it from its registry") from exc
        return cls(**values)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_adapter(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: AdapterMeta) -> tuple[str, int]:
    """Write ``state`` and ``meta`` atomically (temporary file in the same folder, then rename).

    Returns:
        The file's sha256 and its size in bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    data = _canonical(save(tensors, metadata=meta.to_strings(tensors_sha256(tensors))))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest(), len(data)


def _canonical(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted, so equal tensors and metadata give equal bytes.

    (safetensors writes the metadata in hash-map order, which changes from run to run.)
    """
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header with spaces to a multiple of 8 bytes
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def read_meta(path: str | os.PathLike) -> AdapterMeta:
    """Read only the metadata of an adapter file (no tensors)."""
    path = Path(path)
    _check_exists(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a readable adapter file ({exc}); re-export or retrain it") from exc
    return AdapterMeta.from_strings(meta, str(path))


def load_adapter(path: str | os.PathLike, *, sha256: str | None = None,
                 fingerprint: str | None = None, device: str | torch.device = "cpu") -> tuple[dict, AdapterMeta]:
    """Read an adapter file in one pass, checking it before use.

    Args:
        path: the ``.safetensors`` file.
        sha256: the whole file's expected hash (from the registry), if known.
        fingerprint: the fingerprint of the backbone it will be attached to, if known.
        device: where to put the tensors.

    Returns:
        The tensors by name and the metadata.
    """
    path = Path(path)
    _check_exists(path)
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ArtifactError(f"{path} has changed since it was registered (sha256 mismatch): the file is corrupt "
                            "or was replaced; remove this version and retrain, or import a good copy")
    try:
        state = load(data)
        header_len = int.from_bytes(data[:8], "little")
        raw_meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path} is not a readable adapter file ({exc}); re-export or retrain it") from exc
    meta = AdapterMeta.from_strings(raw_meta, str(path))
    if tensors_sha256(state) != raw_meta.get("tensors_sha256"):
        raise ArtifactError(f"{path} is corrupt: its tensors do not match the hash it was saved with")
    if fingerprint is not None and meta.backbone_fingerprint != fingerprint:
        raise ArtifactError(
            f"{path} was trained on backbone {meta.backbone} with fingerprint {meta.backbone_fingerprint[:12]}, "
            f"not on this backbone ({fingerprint[:12]}): load it with the backbone it was trained on"
        )
    return {k: v.to(device) for k, v in state.items()}, meta


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise ArtifactError(f"adapter file {path} is missing: remove this version (adaptkit remove) or retrain it")

"""Adapter files: one ``.safetensors`` per adapter version, holding only the task's tensors and head.

The file's metadata (strings, as safetensors requires) make it self-describing, so it can be loaded, exported and
imported with no outside knowledge. ``tensors_sha256`` covers the tensors, so a file checks itself even where no
registry recorded its hash; the registry also records the sha256 of the whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from adaptkit.errors import ArtifactError, ConfigError
from adaptkit.hashing import tensors_sha256
from adaptkit.metadata import classes_problem, data_config_problem, dataset_problem, fingerprint_problem
from adaptkit.tempfiles import hold, remove_stale, temp_beside

if TYPE_CHECKING:  # torch is imported where tensors are made: reading the registry (`adaptkit list`) needs none
    import torch

__all__ = ["FORMAT_VERSION", "ROUTING_PREFIX", "TASK_NAME", "AdapterMeta", "adapter_bytes", "check_task_name",
           "save_adapter", "load_adapter", "parse_adapter", "read_meta", "file_sha256", "tensors_sha256"]

FORMAT_VERSION = "1"
FORMAT_NAME = "adaptkit.adapter"
# tensors under this prefix are routing statistics (adaptkit.inference.routing_stats), not trainable
ROUTING_PREFIX = "routing."
TASK_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z, not $: "$" passes a trailing newline
# Stored as written; half precision is widened exactly on load; anything else (float64, ints) is refused.
STORED_DTYPES = ("torch.float32", "torch.float16", "torch.bfloat16")
WEIGHT_SOURCES = ("hub", "package", "random")
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
        except (KeyError, TypeError, json.JSONDecodeError, RecursionError) as exc:  # Recursion: nested too deep
            raise ArtifactError(f"{where} has damaged metadata ({str(exc)[:200]}); re-export it from its "
                                "registry") from None
        problem = meta_problem(values)
        if problem:
            raise ArtifactError(f"{where} has bad metadata: {problem}; re-export it from its registry")
        return cls(**values)

    def check(self, where: str) -> None:
        """Raise :class:`ArtifactError` naming the first field whose type or value is wrong."""
        problem = meta_problem(asdict(self))
        if problem:
            raise ArtifactError(f"{where} has bad metadata: {problem}")


def check_task_name(name: Any) -> None:
    """Refuse a task name that is not 1-64 letters, digits, '_', '-', '.' starting with a letter or digit."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ConfigError(f"bad task name {name!r}: use letters, digits, '_', '-', '.', up to 64 characters, "
                          "starting with a letter or digit")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def meta_problem(v: dict[str, Any]) -> str | None:
    """What is wrong with metadata values (as read back from JSON), or None. Types and values only; whether the
    method and backbone exist is :mod:`adaptkit.registry.validate`'s business."""
    classes = v.get("classes")
    checks = [
        (isinstance(v.get("task"), str) and TASK_NAME.fullmatch(v["task"]) is not None,
         f"task name {v.get('task')!r} is not 1-64 letters, digits, '_', '-', '.'"),
        (classes_problem(classes) is None, classes_problem(classes)),
        (isinstance(v.get("method"), str) and v["method"] != "", "method must be a name"),
        (isinstance(v.get("method_config"), dict), "method_config must be a dict"),
        (isinstance(v.get("backbone"), str) and 0 < len(v["backbone"]) <= 200, "backbone must be a model name"),
        (isinstance(v.get("backbone_weights"), str) and (v["backbone_weights"] in WEIGHT_SOURCES
                                                         or v["backbone_weights"].startswith("file:")),
         f"backbone_weights {v.get('backbone_weights')!r} is not one of hub, package, random, file:PATH"),
        (fingerprint_problem(v.get("backbone_fingerprint")) is None, "backbone_fingerprint must be 64 hex digits"),
        (isinstance(v.get("backbone_params"), int) and not isinstance(v["backbone_params"], bool)
         and v["backbone_params"] > 0, "backbone_params must be a positive integer"),
        (isinstance(v.get("backbone_dim"), int) and not isinstance(v["backbone_dim"], bool)
         and v["backbone_dim"] > 0, "backbone_dim must be a positive integer"),
        (data_config_problem(v.get("data_config")) is None, data_config_problem(v.get("data_config"))),
        (dataset_problem(v.get("dataset", "")) is None, dataset_problem(v.get("dataset", ""))),
        (isinstance(v.get("metrics", {}), dict)
         and all(isinstance(k, str) and (x is None or _is_number(x)) for k, x in v.get("metrics", {}).items()),
         "metrics must be a dict of numbers"),
    ]
    return next((message for ok, message in checks if not ok), None)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_bytes(state: dict[str, torch.Tensor], meta: AdapterMeta) -> bytes:
    """The bytes of the adapter file for ``state`` and ``meta``: equal inputs give equal bytes.

    Raises:
        ArtifactError: ``state`` is empty, or not a mapping of names to tensors.
    """
    import torch
    from safetensors.torch import save

    if not isinstance(state, dict) or not state:
        raise ArtifactError(f"the adapter state of {meta.task!r} holds no tensors: give the tensors the method "
                            "trained (Method.state()) and its head")
    wrong = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)),
                 None)
    if wrong is not None:
        raise ArtifactError(f"the adapter state of {meta.task!r} maps {wrong[0]!r} to a {type(wrong[1]).__name__}, "
                            "not a tensor: give only tensors, by name")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return _canonical(save(tensors, metadata=meta.to_strings(tensors_sha256(tensors))))


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    The temporary name is ``.<name>.<random>.tmp`` (what the registry's sweep recognises as its own); the file is
    created like any other (mode 0666 less the umask), not 0600 as ``mkstemp`` would. It is held while written, and
    what killed writers of ``path`` left is removed first (see :mod:`adaptkit.tempfiles`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            hold(fh.fileno())
            remove_stale(path)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            os.replace(tmp, path)  # while still held
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_adapter(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: AdapterMeta) -> tuple[str, int]:
    """Write ``state`` and ``meta`` atomically (temporary file in the same folder, then rename).

    Returns:
        The file's sha256 and its size in bytes.
    """
    data = adapter_bytes(state, meta)
    write_atomic(path, data)
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
    except (SafetensorError, OSError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{path} is not a readable adapter file ({exc}); re-export or retrain it") from exc
    return AdapterMeta.from_strings(meta, str(path))


def load_adapter(path: str | os.PathLike, *, sha256: str | None = None,
                 fingerprint: str | None = None, device: str | torch.device = "cpu") -> tuple[dict, AdapterMeta]:
    """Read an adapter file in one pass, checking it before use.

    Args:
        path: the ``.safetensors`` file.
        sha256: the whole file's expected hash (from the registry), if known; when it matches, the tensors are not
            hashed again (their own hash is checked only for a file without one).
        fingerprint: the fingerprint of the backbone it will be attached to, if known.
        device: where to put the tensors.

    Returns:
        The tensors by name and the metadata.
    """
    path = Path(path)
    _check_exists(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read adapter file {path} ({exc.strerror}): check its permissions") from exc
    return parse_adapter(data, str(path), sha256=sha256, fingerprint=fingerprint, device=device)


def parse_adapter(data: bytes, where: str, *, sha256: str | None = None, fingerprint: str | None = None,
                  device: str | torch.device = "cpu") -> tuple[dict, AdapterMeta]:
    """Check and read the bytes of an adapter file (see :func:`load_adapter`); ``where`` names it in errors."""
    import torch
    from safetensors.torch import load

    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ArtifactError(f"{where} has changed since it was registered (sha256 mismatch): the file is corrupt "
                            "or was replaced; remove this version and retrain, or import a good copy")
    try:
        state = load(data)
        header_len = int.from_bytes(data[:8], "little")
        raw_meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError, RuntimeError, AttributeError) as exc:
        raise ArtifactError(f"{where} is not a readable adapter file ({exc}); re-export or retrain it") from exc
    meta = AdapterMeta.from_strings(raw_meta, where)
    # the registry's hash of the whole file stands for the tensors' own: every file the registry records was written
    # from its tensors (add_version) or had its tensor hash checked when it came in (import, doctor), so bytes equal
    # to the recorded ones hold matching tensors; only a file without a recorded hash is hashed a second time
    if sha256 is None and tensors_sha256(state) != raw_meta.get("tensors_sha256"):
        raise ArtifactError(f"{where} is corrupt: its tensors do not match the hash it was saved with")
    if fingerprint is not None and meta.backbone_fingerprint != fingerprint:
        raise ArtifactError(
            f"{where} was trained on backbone {meta.backbone} with fingerprint {meta.backbone_fingerprint[:12]}, "
            f"not on this backbone ({fingerprint[:12]}): load it with the backbone it was trained on"
        )
    own = {k: t for k, t in state.items() if not k.startswith(ROUTING_PREFIX)}  # routing counts are integers
    bad = next((k for k, t in own.items() if str(t.dtype) not in STORED_DTYPES), None)
    if bad is not None:
        raise ArtifactError(f"{where}: tensor {bad} is {state[bad].dtype}; adapter files hold float32 (or float16/"
                            "bfloat16) tensors only: re-export it from adaptkit")
    return {k: v.to(device=device, dtype=torch.float32 if k in own else None) for k, v in state.items()}, meta


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise ArtifactError(f"adapter file {path} is missing: remove this version (adaptkit remove) or retrain it")

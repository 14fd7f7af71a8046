"""What every adapter store shares: the :class:`Storage` interface, the records it lists (:class:`StoredFile`,
:class:`Upload`) and the rules for the file names it accepts. The stores themselves are in
:mod:`adaptkit.registry.storage`.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from adaptkit.errors import RegistryError

_PART = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
# ".<name>.<random>.tmp": write_atomic's temporary files (and mkstemp's, in older releases)
_TEMP = re.compile(r"\A\.[A-Za-z0-9][A-Za-z0-9_.-]*\.tmp\Z")
_OWN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}/[0-9a-f]{12,64}\.safetensors\Z")  # TASK/<sha256>


@dataclass(frozen=True)
class StoredFile:
    """One file under a store's root: its relative name, size and age in seconds."""

    rel: str
    size: int
    age_s: float


@dataclass(frozen=True)
class Upload:
    """A write begun and never finished that the store keeps out of sight: its file's name, id and age in seconds."""

    rel: str
    id: str
    age_s: float


def check_rel(rel: object) -> str:
    """``rel`` if it is a plain relative name inside a store (``task/file``), else :class:`RegistryError`.

    Only names the registry makes pass: no absolute path, no ``..``, no empty part, no backslash, no hidden part
    but a temporary file's name.
    """
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if (not parts or "\\" in rel or rel != "/".join(parts) or not all(_PART.fullmatch(p) for p in parts[:-1])
            or not (_PART.fullmatch(parts[-1]) or _TEMP.fullmatch(parts[-1]))):
        raise RegistryError(f"unsafe adapter file name {rel!r} in the registry (outside its adapter folder?): "
                            "run `adaptkit doctor` to see and repair bad rows")
    return rel


def is_own_file(rel: str) -> bool:
    """Whether ``rel`` is a name the registry makes: ``TASK/<hex>.safetensors`` or a temporary file of one."""
    return is_temp(rel) or _OWN.fullmatch(rel) is not None


def is_temp(rel: str) -> bool:
    """Whether ``rel`` is a temporary file of an atomic write (a crash leftover unless a writer is live)."""
    return _TEMP.fullmatch(PurePosixPath(rel).name) is not None


class Storage(ABC):
    """A flat store of files under one root, addressed by relative names."""

    url: str
    #: a file younger than this may belong to a write in flight, when no lock proves that none is
    in_flight_s: float = 3600.0
    #: whether :meth:`writing` and :meth:`sweeping` lock out each other (a folder on a system with ``flock``)
    locks: bool = False

    @abstractmethod
    def put(self, rel: str, data: bytes) -> None:
        """Store ``data`` under ``rel``, visible only once complete."""

    @abstractmethod
    def get(self, rel: str) -> bytes:
        """The bytes under ``rel`` (:class:`FileNotFoundError` if none)."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Delete ``rel`` if it exists."""

    @abstractmethod
    def files(self) -> list[StoredFile]:
        """Every file under the root, temporary ones included."""

    def uploads(self) -> list[Upload]:
        """Unfinished writes the store keeps apart from its files (S3's multipart uploads); none elsewhere."""
        return []

    def discard(self, upload: Upload) -> None:
        """Abort an unfinished write, freeing what it stored."""
        raise RegistryError(f"adapter store {self.url} keeps no unfinished writes: nothing to abort")

    def location(self, rel: str) -> str:
        """Where ``rel`` is, for people to read."""
        return f"{self.url.rstrip('/')}/{check_rel(rel)}"

    def local_path(self, rel: str) -> Path | None:
        """A local path to read ``rel`` from without a copy, where the store has one."""
        return None

    def local_path_root(self) -> Path | None:
        """The local folder of the store, where it has one."""
        return None

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Held by a writer from its first byte to its row's commit."""
        yield

    @contextlib.contextmanager
    def sweeping(self) -> Iterator[bool]:
        """Yields whether no writer can be in flight (then every unreferenced file is a leftover)."""
        yield False

"""How a registry keeps its adapter files in step with its rows: a file stored for a row about to commit, a file
deleted once no row refers to it, and sweeps of what a crashed write left (temporary files, orphans, uploads).

:class:`Housekeeping` is mixed into :class:`~adaptkit.registry.Registry`; it uses the registry's ``storage``,
``exists``, ``session``, ``url`` and ``_file``. See :mod:`adaptkit.registry.storage` for when a write counts as in
flight.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import func, select

from adaptkit.errors import RegistryError
from adaptkit.registry import db
from adaptkit.registry.storage import StoredFile, Upload, is_own_file, is_temp
from adaptkit.registry.tables import VersionRow

__all__ = ["Housekeeping", "OWNER_FILE"]

_log = logging.getLogger(__name__)
OWNER_FILE = "REGISTRY"  # in an adapter store: the registry that may delete the store's orphan files


class Housekeeping:
    """The write protocol's file side and the crash leftovers (see the module's docstring)."""

    def _ensure_stored(self, rel: str, data: bytes) -> None:
        """After a commit, on a store without locks: put the file back if a remover of a version with the same
        content deleted it between this writer's put and its commit (see :meth:`_drop_unreferenced`)."""
        if not self.storage.locks and not self.storage.exists(rel):
            _log.warning("%s was deleted while its row committed: writing it again", rel)
            self.storage.put(rel, data)

    def _drop_unreferenced(self, rel: str) -> None:
        """Delete the stored file ``rel`` (of a row just removed or moved) if no row refers to it.

        Files are named by content, so a writer may be storing the same file for a new row that has not committed
        yet. With locks, the file goes only when no writer is in flight (else the writer's own sweep takes it if it
        is still a leftover); without, it is read first and put back if a row refers to it after the delete.
        """
        try:
            with self.storage.sweeping() as alone:
                if self.referenced(rel):
                    return
                if alone:
                    self.storage.delete(rel)
                    return
                if self.storage.locks:
                    _log.info("left %r for the sweep: a write is in flight", rel)
                    return
                try:
                    data = self.storage.get(rel)
                except FileNotFoundError:
                    return
                self.storage.delete(rel)
                if self.referenced(rel):
                    self.storage.put(rel, data)
        except (OSError, RegistryError) as exc:  # the row has moved on; the file is a leftover for the sweep
            _log.warning("did not delete %r: %s", rel, exc)

    @contextmanager
    def _storing(self, rel: str, data: bytes) -> Iterator[None]:
        """Put ``data`` at ``rel`` for a row committed inside the block; take the file away if the block fails."""
        with self.storage.writing():
            self._check_store()  # a fresh store is claimed (REGISTRY written) under the lock, out of a sweep's reach
            existed = self.storage.exists(rel)
            self.storage.put(rel, data)
            try:
                yield
            except BaseException:
                if not existed and not self.referenced(rel):
                    self.storage.delete(rel)
                raise

    def referenced(self, rel: str) -> bool:
        """Whether any version's row refers to the stored file ``rel``."""
        if not self.exists:
            return False
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(VersionRow).where(VersionRow.file == rel)) > 0

    # -- crash leftovers ---------------------------------------------------------------------------------------

    def leftovers(self, alone: bool, min_age_s: float | None = None) -> list[StoredFile]:
        """The files a crashed write left: this registry's temporary files and adapter files no row refers to.

        Args:
            alone: no write can be in flight (the storage's sweep lock is held): every leftover counts.
            min_age_s: otherwise, only files older than this count (default: the storage's in-flight time).
        """
        with self.session() as s:
            referenced = set(s.scalars(select(VersionRow.file)))
        age = self.leftover_age(alone, min_age_s)
        owner = self.owns_store()
        return [f for f in self.storage.files()
                if f.rel not in referenced and is_own_file(f.rel) and (owner or is_temp(f.rel)) and f.age_s >= age]

    def leftover_age(self, alone: bool, min_age_s: float | None = None) -> float:
        """How old (seconds) a file or upload no row refers to must be to count as a leftover: any age when
        ``alone``; none at all while a writer holds a locking store's lock (any file may be that live writer's,
        whatever ``min_age_s`` says); else ``min_age_s`` (default: the storage's in-flight time)."""
        if alone:
            return 0.0
        if self.storage.locks:
            return math.inf
        return self.storage.in_flight_s if min_age_s is None else min_age_s

    def own_uploads(self) -> list[Upload]:
        """The unfinished writes of adapter files in an object store (S3 multipart uploads), whoever left them."""
        return [u for u in self.storage.uploads() if is_own_file(u.rel)]

    def stale_uploads(self, alone: bool, min_age_s: float | None = None) -> list[Upload]:
        """The unfinished writes a crash left, by the same age rule as :meth:`leftovers`; none unless this
        registry owns the store."""
        uploads, age = self.own_uploads(), self.leftover_age(alone, min_age_s)
        return [u for u in uploads if u.age_s >= age] if uploads and self.owns_store() else []

    def owns_store(self) -> bool:
        """Whether the adapter store is this registry's (the first registry to write into a store claims it).

        Two registries pointed at one folder (``a.db`` and ``b.db`` side by side share ``adapters/``) would each
        take the other's files for orphans and sweep them: the store's ``REGISTRY`` file names its registry, which
        alone writes and sweeps there; another only reads, so no registry ever loses a file to another's sweep.
        """
        try:
            return self.storage.get(OWNER_FILE).decode(errors="replace").strip() == self._identity
        except FileNotFoundError:
            self.storage.put(OWNER_FILE, self._identity.encode())
            return True

    @property
    def _identity(self) -> str:
        """Which registry this is, whoever connects: the server and database; for SQLite the database file, by its
        name alone when the store sits beside it (so a registry's folder can be copied or moved whole)."""
        if self._file is None:
            return db.identity(self.url)
        root = self.storage.local_path_root()
        return self._file.name if root is not None and root.parent == self._file.parent else str(self._file)

    def _check_store(self) -> None:
        if not self.owns_store():
            owner = self.storage.get(OWNER_FILE).decode(errors="replace").strip()
            raise RegistryError(f"the adapter folder {self.storage.url} belongs to the registry {owner} (its "
                                f"{OWNER_FILE} file says so): give this registry its own folder with "
                                "$ADAPTKIT_ADAPTERS, or move it to its own directory; if that was this registry "
                                f"before it moved, delete {OWNER_FILE}")

    def sweep(self) -> list[str]:
        """Delete this registry's crash leftovers: temporary files, files no row refers to, unfinished uploads.

        Only when no write can be in flight (see :mod:`adaptkit.registry.storage`); returns what was deleted. Never
        raises for a file it cannot delete: a sweep is housekeeping, the next one tries again.
        """
        deleted = []
        try:
            with self.storage.sweeping() as alone:
                for f in self.leftovers(alone):
                    try:
                        self.storage.delete(f.rel)
                        deleted.append(f.rel)
                    except (OSError, RegistryError) as exc:
                        _log.warning("could not delete leftover %s: %s", f.rel, exc)
                for u in self.stale_uploads(alone):
                    try:
                        self.storage.discard(u)
                        deleted.append(f"{u.rel} (unfinished upload)")
                    except RegistryError as exc:
                        _log.warning("could not abort the upload of %s: %s", u.rel, exc)
        except RegistryError as exc:
            _log.warning("no sweep: %s", exc)
        if deleted:
            _log.info("swept %d leftover file(s) from %s", len(deleted), self.storage.url)
        return deleted

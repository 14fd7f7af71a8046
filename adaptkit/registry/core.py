"""The registry: backbones, tasks and adapter versions in SQL (SQLite by default), adapter files beside it.

Every change is one transaction. Adding a version writes its file first (atomically) and removes it again if the
row cannot be committed; removing a version deletes its row first and its file after the commit. So no row ever
points at a missing file because of adaptkit, and no file is left behind by a failed add. The file side of that
protocol and the sweeps are in :mod:`.housekeeping`, export and import in :mod:`.transfer`, finding versions and
reading their files in :mod:`.reading`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from adaptkit.artifacts import ROUTING_PREFIX, AdapterMeta, adapter_bytes, check_task_name
from adaptkit.errors import NotFoundError, RegistryError, param, step
from adaptkit.registry import db
from adaptkit.registry.dberrors import explain_database_errors
from adaptkit.registry.housekeeping import Housekeeping
from adaptkit.registry.reading import Reading, check_task_classes, parse_ref
from adaptkit.registry.storage import Storage, open_storage
from adaptkit.registry.tables import BackboneRow, Base, TaskRow, VersionRow
from adaptkit.registry.transfer import Transfers

__all__ = ["Registry", "default_url", "parse_ref"]

_log = logging.getLogger(__name__)


def default_url() -> str:
    """``$ADAPTKIT_REGISTRY`` or ``sqlite:///registry.db`` in the working directory."""
    return os.environ.get("ADAPTKIT_REGISTRY") or "sqlite:///registry.db"


class Registry(Reading, Transfers, Housekeeping):
    """A registry at ``url`` (default: :func:`default_url`), with adapter files in ``adapter_dir``.

    ``adapter_dir`` (or ``$ADAPTKIT_ADAPTERS``) is a folder or an fsspec URL such as ``s3://bucket/prefix``
    (see :mod:`adaptkit.registry.storage`). By default, for SQLite it is ``adapters/`` beside the database file;
    for other URLs it is ``$ADAPTKIT_ADAPTER_DIR`` or ``./adapters``.
    """

    def __init__(self, url: str | os.PathLike | None = None, adapter_dir: str | os.PathLike | None = None) -> None:
        if url is not None and not isinstance(url, (str, os.PathLike)):
            raise RegistryError(f"a registry is a path or a URL, got {url!r}")
        self.url = db.normalise_url(url if url is not None else default_url())
        self.engine = db.make_engine(self.url)
        self._writer = self.engine.execution_options(adaptkit_write=True)  # SQLite: BEGIN IMMEDIATE
        self._file = db.sqlite_file(self.url)
        explain_database_errors(self.engine, self.location)
        default_dir = self._file.parent / "adapters" if self._file else \
            Path(os.environ.get("ADAPTKIT_ADAPTER_DIR", "adapters")).resolve()
        self.storage: Storage = open_storage(adapter_dir or os.environ.get("ADAPTKIT_ADAPTERS") or default_dir)
        self.adapter_dir: Path | None = self.storage.local_path_root()
        self._ready = False

    @property
    def location(self) -> str:
        """The database file, or the URL without its password."""
        return str(self._file) if self._file else db.describe(self.url)

    @property
    def exists(self) -> bool:
        """Whether the registry has been created (by its first write); opening it upgrades an older schema."""
        return self._open(create=False)

    def _open(self, create: bool) -> bool:
        """Check the schema (one query), migrate it if it is behind, create it if ``create``; True when usable."""
        if not self._ready:
            if self._file is not None and self._file.is_dir():
                raise RegistryError(f"registry {self._file} is a folder: give the registry's file, e.g. "
                                    f"{param('registry', self._file / 'registry.db')}")
            if self._file is not None and not self._file.is_file():  # connecting would create an empty file
                if not create:
                    return False
                self._check_creatable()
            self._ready = self._retry(lambda: db.ensure_schema(self.engine, Base.metadata, create=create,
                                                               location=self.location))
        return self._ready

    def _check_creatable(self) -> None:
        if self._file is not None and not self._file.parent.is_dir():
            raise RegistryError(f"registry folder {self._file.parent} does not exist: create it or pass another "
                                f"{param('registry')}")

    def session(self) -> Session:
        """A session for reading; a missing registry is a :class:`NotFoundError` (reads never create one)."""
        if not self._open(create=False):
            raise NotFoundError(f"no registry at {self.location} yet: train a task first ({step('train')}) or "
                                f"pass {param('registry')}")
        return Session(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in a write transaction holding the registry's write lock; creates the registry if need be."""
        self._open(create=True)
        with Session(self._writer, expire_on_commit=False) as s, s.begin():
            db.write_lock(s.connection())
            yield s

    def _retry(self, fn: Any, attempts: int = 5) -> Any:
        """Run ``fn``, retrying a few times if another writer held the database beyond its busy timeout."""
        for i in range(attempts):
            try:
                return fn()
            except DBAPIError as exc:
                if db.retryable(exc) and i < attempts - 1:
                    time.sleep(0.2 * (i + 1))
                    continue
                if isinstance(exc, OperationalError):
                    raise RegistryError(f"registry {self.location} is busy or unwritable: {exc.orig}") from exc
                raise

    # -- writing -----------------------------------------------------------------------------------------------

    def add_version(self, meta: AdapterMeta, state: dict, *, train_info: dict | None = None,
                    make_default: bool = True) -> VersionRow:
        """Write the adapter file and record it as the task's next version, in one transaction.

        The file is named by its sha256 (so writing it twice is harmless) and is complete before the row that
        points at it commits; if the row cannot be committed, the file goes again (unless another row uses it).

        Args:
            meta: the adapter's self-description (task, classes, method, backbone, metrics ...).
            state: the adapter's tensors (every one of them trainable: their count is the trainable parameters).
            train_info: training facts: time, images/s, peak memory, device, recipe.
            make_default: make the new version the task's default.
        """
        check_task_name(meta.task)
        meta.check(f"adapter of task {meta.task}")
        self._check_creatable()  # before the adapter folder is made beside a registry that cannot be
        info = dict(train_info or {})
        data = adapter_bytes(state, meta)
        sha, size = hashlib.sha256(data).hexdigest(), len(data)
        rel = f"{meta.task}/{sha}.safetensors"
        trainable = sum(t.numel() for k, t in state.items() if not k.startswith(ROUTING_PREFIX))
        with self._storing(rel, data):
            row = self._retry(lambda: self._insert(meta, Path(rel), sha, size, trainable, info, make_default))
        self._ensure_stored(rel, data)
        self.sweep()
        return row

    def _insert(self, meta: AdapterMeta, rel: Path, sha: str, size: int, trainable: int, info: dict,
                make_default: bool) -> VersionRow:
        with self.transaction() as s:
            backbone = s.scalar(select(BackboneRow).where(BackboneRow.fingerprint == meta.backbone_fingerprint))
            if backbone is None:
                backbone = BackboneRow(name=meta.backbone, weights=meta.backbone_weights,
                                       num_params=meta.backbone_params, embed_dim=meta.backbone_dim,
                                       fingerprint=meta.backbone_fingerprint, data_config=meta.data_config)
                s.add(backbone)
            task = s.scalar(select(TaskRow).where(TaskRow.name == meta.task))
            check_task_classes(task, meta.task, meta.classes)
            if task is None:
                task = TaskRow(name=meta.task, dataset=meta.dataset, classes=list(meta.classes))
                s.add(task)
                s.flush()
            last = s.scalar(select(func.max(VersionRow.version)).where(VersionRow.task_id == task.id)) or 0
            if make_default:
                for v in task.versions:
                    v.is_default = False
            row = VersionRow(
                task=task, version=last + 1, backbone=backbone, method=meta.method, config=meta.method_config,
                trainable_params=trainable, file=rel.as_posix(), sha256=sha, bytes=size, metrics=meta.metrics,
                train={k: v for k, v in info.items() if k not in ("train_time_s", "peak_memory_mb", "device")},
                train_time_s=info.get("train_time_s"), peak_memory_mb=info.get("peak_memory_mb"),
                device=info.get("device"), is_default=make_default or last == 0,
            )
            s.add(row)
            s.flush()
            _ = row.task.name, row.backbone.name
        return row

    def replace_file(self, version: VersionRow, state: dict, meta: AdapterMeta) -> VersionRow:
        """Rewrite a version's adapter file (e.g. with routing statistics added) as a new file, in one transaction.

        The new file is written first; the row moves to it only if it still points at the file ``version`` was
        read from (another writer's change is never overwritten); the old file is deleted after the commit.
        """
        meta.check(f"adapter of {version.ref}")
        data = adapter_bytes(state, meta)
        sha, size = hashlib.sha256(data).hexdigest(), len(data)
        rel = f"{version.task.name}/{sha}.safetensors"

        def _swap() -> None:
            with self.transaction() as s:
                row = s.get(VersionRow, version.id)
                if row is None or row.sha256 != version.sha256:
                    raise RegistryError(f"{version.ref} changed or was removed while its file was rewritten: "
                                        "run the command again")
                row.file, row.sha256, row.bytes = rel, sha, size

        with self._storing(rel, data):
            self._retry(_swap)
        self._ensure_stored(rel, data)
        self._drop_unreferenced(version.file)
        return self.get_version(version.ref)

    def remove(self, ref: str) -> list[str]:
        """Remove a task (every version) or one version ``task@N``; returns the refs removed.

        The rows go in one transaction; the files are deleted only after it commits, and only those no remaining
        row refers to (files are named by content, so two versions can share one).
        """
        name, number = parse_ref(ref)
        self.get_version(ref, allow_broken=True)  # a clear NotFoundError for a missing task or version
        files, removed = [], []

        def _delete() -> None:
            files.clear()
            removed.clear()
            with self.transaction() as s:
                task = s.scalar(select(TaskRow).where(TaskRow.name == name))
                if task is None:
                    raise NotFoundError(f"no task {name!r} in the registry")
                doomed = [v for v in task.versions if number is None or v.version == number]
                for v in doomed:
                    files.append(v.file)
                    removed.append(f"{name}@{v.version}")
                    task.versions.remove(v)
                    s.delete(v)
                if not task.versions:
                    s.delete(task)
                elif not any(v.is_default for v in task.versions):
                    task.versions[-1].is_default = True

        self._retry(_delete)
        for rel in files:
            self._drop_unreferenced(rel)
        return removed

    def set_default(self, ref: str) -> VersionRow:
        """Make ``task@N`` its task's default version."""
        target = self.get_version(ref)

        def _set() -> None:
            with self.transaction() as s:
                for v in s.scalars(select(VersionRow).where(VersionRow.task_id == target.task_id)):
                    v.is_default = v.id == target.id

        self._retry(_set)
        return self.get_version(f"{target.task.name}@{target.version}")

"""The registry: backbones, tasks and adapter versions in SQL (SQLite by default), adapter files beside it.

Every change is one transaction. Adding a version writes its file first (atomically) and removes it again if the
row cannot be committed; removing a version deletes its row first and its file after the commit. So no row ever
points at a missing file because of adaptkit, and no file is left behind by a failed add.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Integer, String, UniqueConstraint, func, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from adaptkit import db
from adaptkit.artifacts import (
    ROUTING_PREFIX,
    TASK_NAME,
    AdapterMeta,
    adapter_bytes,
    check_task_name,
    load_adapter,
    parse_adapter,
    write_atomic,
)
from adaptkit.dberrors import explain_database_errors
from adaptkit.errors import ArtifactError, ConfigError, NotFoundError, RegistryError
from adaptkit.rows import TolerantDateTime as DateTime
from adaptkit.rows import TolerantJSON as JSON
from adaptkit.rows import task_problem, version_problem
from adaptkit.storage import Storage, StoredFile, Upload, is_own_file, is_temp, open_storage
from adaptkit.suggest import did_you_mean

__all__ = ["Base", "BackboneRow", "TaskRow", "VersionRow", "Registry", "default_url", "parse_ref", "TASK_NAME",
           "OWNER_FILE"]

_log = logging.getLogger(__name__)
OWNER_FILE = "REGISTRY"  # in an adapter store: the registry that may delete the store's orphan files
Count = BigInteger().with_variant(Integer(), "sqlite")  # sizes past 2 GB on PostgreSQL; SQLite's INTEGER is 64-bit


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class BackboneRow(Base):
    __tablename__ = "backbones"
    __table_args__ = (UniqueConstraint("fingerprint"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    weights: Mapped[str] = mapped_column(String(1000))  # hub | package | random | file:<path>
    fingerprint: Mapped[str] = mapped_column(String(64))
    num_params: Mapped[int] = mapped_column(Count)
    embed_dim: Mapped[int]
    data_config: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class TaskRow(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    dataset: Mapped[str] = mapped_column(String(1000))
    classes: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    versions: Mapped[list[VersionRow]] = relationship(back_populates="task", order_by="VersionRow.version",
                                                      cascade="all, delete-orphan")

    @property
    def default(self) -> VersionRow | None:
        return next((v for v in self.versions if v.is_default), self.versions[-1] if self.versions else None)

    @property
    def problem(self) -> str | None:
        """Why this row is broken (tampered or damaged), or None: see :mod:`adaptkit.rows`."""
        return task_problem(self)

    @property
    def broken(self) -> str | None:
        """Why the task cannot be used as it stands (its row or its default version is bad), or None."""
        d = self.default
        return self.problem or (d.problem if d is not None else "it has no versions")


class VersionRow(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("task_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    version: Mapped[int]
    backbone_id: Mapped[int] = mapped_column(ForeignKey("backbones.id"))
    method: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict] = mapped_column(JSON)
    trainable_params: Mapped[int] = mapped_column(Count)
    file: Mapped[str] = mapped_column(String(1000))  # relative to the registry's adapter folder
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Count)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)  # val/test top-1, top-5, loss ...
    train: Mapped[dict] = mapped_column(JSON, default=dict)  # recipe, epochs, seed, images/s ...
    train_time_s: Mapped[float | None]
    peak_memory_mb: Mapped[float | None]
    device: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default="ready")
    is_default: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    task: Mapped[TaskRow] = relationship(back_populates="versions")
    backbone: Mapped[BackboneRow] = relationship()

    @property
    def ref(self) -> str:
        return f"{self.task.name}@{self.version}"

    @property
    def problem(self) -> str | None:
        """Why this row is broken (tampered or damaged), or None: see :mod:`adaptkit.rows`."""
        return version_problem(self)


def default_url() -> str:
    """``$ADAPTKIT_REGISTRY`` or ``sqlite:///registry.db`` in the working directory."""
    return os.environ.get("ADAPTKIT_REGISTRY") or "sqlite:///registry.db"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``task`` or ``task@version`` -> (task, version or None)."""
    if not isinstance(ref, str):
        raise ConfigError(f"a version is named by a string, TASK or TASK@N, got {ref!r}")
    name, sep, version = ref.partition("@")
    if sep and not (version.isascii() and version.isdigit()):  # "²".isdigit() is True, int("²") fails
        raise ConfigError(f"bad version in {ref!r}: write TASK or TASK@N with N a version number, e.g. {name}@1")
    return name, int(version) if sep else None


def _no_task(name: str, known: list[str]) -> str:
    """What to say about a task that is not there: the closest names for a typo, how to train only when none is."""
    hint = did_you_mean(name, known)
    if hint:
        return f"no task {name!r} in the registry: {hint} (tasks: {', '.join(known)})"
    if known:
        return f"no task {name!r} in the registry (tasks: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''})"
    return f"no task {name!r} in the registry, which has no tasks yet: train one with `adaptkit train --dataset ...`"


def _check_classes(row: TaskRow | None, task: str, classes: list[str]) -> None:
    if row is not None and list(row.classes) != list(classes):
        raise ConfigError(f"task {task!r} already has {len(row.classes)} classes from {row.dataset} "
                          f"({', '.join(row.classes[:4])}...); a version with other classes "
                          f"({', '.join(classes[:4])}...) cannot join it: pick another --task name")


class Registry:
    """A registry at ``url`` (default: :func:`default_url`), with adapter files in ``adapter_dir``.

    ``adapter_dir`` (or ``$ADAPTKIT_ADAPTERS``) is a folder or an fsspec URL such as ``s3://bucket/prefix``
    (see :mod:`adaptkit.storage`). By default, for SQLite it is ``adapters/`` beside the database file; for other
    URLs it is ``$ADAPTKIT_ADAPTER_DIR`` or ``./adapters``.
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
                                    f"--registry {self._file / 'registry.db'}")
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
                                "--registry")

    def session(self) -> Session:
        """A session for reading; a missing registry is a :class:`NotFoundError` (reads never create one)."""
        if not self._open(create=False):
            raise NotFoundError(f"no registry at {self.location} yet: train a task first (adaptkit train ...) or "
                                "pass --registry")
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

    # -- reading -----------------------------------------------------------------------------------------------

    def tasks(self) -> list[TaskRow]:
        """Every task with its versions and their backbones loaded."""
        if not self.exists:
            return []
        with self.session() as s:
            rows = list(s.scalars(select(TaskRow).order_by(TaskRow.name)))
            for t in rows:
                for v in t.versions:
                    _ = v.backbone, v.task
            return rows

    def get_version(self, ref: str, *, allow_broken: bool = False) -> VersionRow:
        """The version named by ``task`` (its default) or ``task@N``; a broken row is an error unless allowed."""
        name, number = parse_ref(ref)
        if not self.exists:
            raise NotFoundError(f"no task {name!r}: there is no registry at {self.location} yet; train it with "
                                f"`adaptkit train --task {name} ...` or pass --registry")
        with self.session() as s:
            task = s.scalar(select(TaskRow).where(TaskRow.name == name))
            if task is None:
                raise NotFoundError(_no_task(name, list(s.scalars(select(TaskRow.name).order_by(TaskRow.name)))))
            version = task.default if number is None else next((v for v in task.versions if v.version == number), None)
            if version is None:
                have = ", ".join(str(v.version) for v in task.versions) or "none"
                raise NotFoundError(f"task {name!r} has no version {number} (versions: {have})")
            _ = version.backbone, version.task
        problem = None if allow_broken else version.problem
        if problem:
            raise RegistryError(f"{name}@{version.version} is broken: {problem}; run `adaptkit doctor` to see and "
                                f"repair it, or `adaptkit remove {name}@{version.version}`")
        return version

    def check_classes(self, task: str, classes: list[str]) -> None:
        """Refuse, before any training, a new version whose classes differ from the task's."""
        if not self.exists:
            self._check_creatable()
            return
        with self.session() as s:
            _check_classes(s.scalar(select(TaskRow).where(TaskRow.name == task)), task, classes)

    def path_of(self, version: VersionRow) -> Path:
        """The local path of a version's file, proven inside the adapter folder (local storage only)."""
        path = self.storage.local_path(version.file)
        if path is None:
            raise RegistryError(f"adapter files of this registry live in {self.storage.url}, not on a local disk: "
                                "use `adaptkit export` to get a copy")
        return path

    def location_of(self, version: VersionRow) -> str:
        """Where a version's file is (a path or URL), for people to read."""
        return self.storage.location(version.file)

    def load_version(self, version: VersionRow, *, fingerprint: str | None = None,
                     device: str | Any = "cpu") -> tuple[dict, AdapterMeta]:
        """A version's tensors and metadata, checked against its row's sha256 (and ``fingerprint``, if given)."""
        path = self.storage.local_path(version.file) if not version.problem else None
        if path is not None:  # a local file is read in place, as before storage had kinds
            return load_adapter(path, sha256=version.sha256, fingerprint=fingerprint, device=device)
        data, where = self._stored_bytes(version)
        return parse_adapter(data, where, sha256=version.sha256, fingerprint=fingerprint, device=device)

    def _stored_bytes(self, version: VersionRow) -> tuple[bytes, str]:
        """A usable version's file as bytes, and where it is (for messages); a broken row or a missing file is an
        error that says what to do."""
        problem = version.problem
        if problem:
            raise RegistryError(f"version {version.id} is broken: {problem}; run `adaptkit doctor`")
        where = self.storage.location(version.file)
        try:
            return self.storage.get(version.file), where
        except FileNotFoundError as exc:
            raise ArtifactError(f"adapter file {where} is missing: remove this version (adaptkit remove) or run "
                                "`adaptkit doctor`") from exc

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
        info = dict(train_info or {})
        data = adapter_bytes(state, meta)
        sha, size = hashlib.sha256(data).hexdigest(), len(data)
        rel = f"{meta.task}/{sha}.safetensors"
        trainable = sum(t.numel() for k, t in state.items() if not k.startswith(ROUTING_PREFIX))
        self._check_store()
        with self._storing(rel, data):
            row = self._retry(lambda: self._insert(meta, Path(rel), sha, size, trainable, info, make_default))
        self._ensure_stored(rel, data)
        self.sweep()
        return row

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
            _check_classes(task, meta.task, meta.classes)
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
        self._check_store()

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

    # -- moving versions between registries -------------------------------------------------------------------

    def export(self, ref: str, dest: str | os.PathLike, overwrite: bool = False) -> Path:
        """Copy a version's adapter file to ``dest`` after checking it; it describes itself and can be imported.

        ``dest`` is a file, or a folder that gets ``TASK-vN.safetensors``; its folder must exist.
        """
        version = self.get_version(ref)
        data = self._checked_bytes(version)
        dest = Path(dest).expanduser()
        if dest.is_dir():
            check_task_name(version.task.name)  # a name from the database becomes a file name: prove it plain
            dest = dest / f"{version.task.name}-v{version.version}.safetensors"
        if not dest.parent.is_dir():
            raise ConfigError(f"cannot export to {dest}: folder {dest.parent} does not exist: create it first or "
                              "export somewhere else")
        if dest.exists() and not overwrite:
            raise ConfigError(f"{dest} exists already: pick another path or pass --force to overwrite it")
        if dest.exists() and not dest.is_file():
            raise ConfigError(f"{dest} is not a regular file: pick another path")
        try:
            write_atomic(dest, data)
        except OSError as exc:
            raise ConfigError(f"cannot write {dest}: {exc.strerror}") from exc
        return dest

    def _checked_bytes(self, version: VersionRow) -> bytes:
        """A version's file as bytes, after the same checks as loading (never hand out a damaged file)."""
        data, where = self._stored_bytes(version)
        parse_adapter(data, where, sha256=version.sha256)
        return data

    def import_file(self, path: str | os.PathLike, task: str | None = None) -> VersionRow:
        """Add an exported adapter file as the next version of its task (or of ``task``), after checking it whole.

        The file must be a regular file; its metadata and tensors are checked against its method and backbone
        (:func:`adaptkit.validate.check_adapter`). A file identical to a version the task has already is refused.
        """
        from adaptkit.validate import check_adapter

        path = Path(path).expanduser()
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "is missing"
            raise ArtifactError(f"{path} {what}: give the path of an exported .safetensors adapter file")
        state, meta = load_adapter(path)
        if task is not None:
            check_task_name(task)
            meta.task = task
        check_adapter(state, meta, str(path))
        self._check_weights_source(meta, path)
        info = {"imported_from": str(path.resolve()), **({"recipe": meta.recipe} if meta.recipe else {})}
        self.check_new(meta, state, str(path))
        return self.add_version(meta, state, train_info=info)

    def check_new(self, meta: AdapterMeta, state: dict, where: str) -> None:
        """Refuse an import whose adapter is identical to a version its task has already."""
        if not self.exists:
            return
        sha = hashlib.sha256(adapter_bytes(state, meta)).hexdigest()
        with self.session() as s:
            same = s.scalar(select(VersionRow).join(TaskRow).where(TaskRow.name == meta.task, VersionRow.sha256 == sha))
            if same is not None:
                raise ConfigError(f"{where} is identical to {meta.task}@{same.version} already in this registry: "
                                  "nothing to import")

    def _check_weights_source(self, meta: AdapterMeta, path: Path) -> None:
        """A ``file:`` backbone source from a file is a path on someone else's disk: never read it on trust.

        It is accepted only when this registry knows the backbone already (its own row then says where the
        weights are); otherwise the user registers that backbone first by training with ``--weights``.
        """
        if not meta.backbone_weights.startswith("file:"):
            return
        known = None
        if self.exists:
            with self.session() as s:
                known = s.scalar(select(BackboneRow).where(BackboneRow.fingerprint == meta.backbone_fingerprint))
        if known is None:
            raise ArtifactError(f"{path} was trained on {meta.backbone} with weights from a local file "
                                f"({meta.backbone_weights[5:]}) this registry does not know: train any task here "
                                "with --weights FILE for that backbone first, then import it")

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
        ``alone``, else ``min_age_s`` (default: the storage's in-flight time)."""
        return 0.0 if alone else (self.storage.in_flight_s if min_age_s is None else min_age_s)

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

        Only when no write can be in flight (see :mod:`adaptkit.storage`); returns what was deleted. Never raises
        for a file it cannot delete: a sweep is housekeeping, the next one tries again.
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

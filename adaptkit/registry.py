"""The registry: backbones, tasks and adapter versions in SQL (SQLite by default), adapter files beside it.

Every change is one transaction. Adding a version writes its file first (atomically) and removes it again if the
row cannot be committed; removing a version deletes its row first and its file after the commit. So no row ever
points at a missing file because of adaptkit, and no file is left behind by a failed add.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, String, UniqueConstraint, create_engine, event, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from adaptkit.artifacts import AdapterMeta, load_adapter, save_adapter
from adaptkit.errors import ConfigError, NotFoundError, RegistryError

__all__ = ["Base", "BackboneRow", "TaskRow", "VersionRow", "Registry", "default_url", "parse_ref", "TASK_NAME"]

_log = logging.getLogger(__name__)
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
    num_params: Mapped[int]
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


class VersionRow(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("task_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    version: Mapped[int]
    backbone_id: Mapped[int] = mapped_column(ForeignKey("backbones.id"))
    method: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict] = mapped_column(JSON)
    trainable_params: Mapped[int]
    file: Mapped[str] = mapped_column(String(1000))  # relative to the registry's adapter folder
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int]
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


def default_url() -> str:
    """``$ADAPTKIT_REGISTRY`` or ``sqlite:///registry.db`` in the working directory."""
    return os.environ.get("ADAPTKIT_REGISTRY") or "sqlite:///registry.db"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``task`` or ``task@version`` -> (task, version or None)."""
    name, sep, version = ref.partition("@")
    if sep and not version.isdigit():
        raise ConfigError(f"bad version in {ref!r}: write TASK or TASK@N with N a version number, e.g. {name}@1")
    return name, int(version) if sep else None


def _normalise_url(url: str) -> str:
    """Accept a plain path to a SQLite file as well as a SQLAlchemy URL."""
    if "://" in url:
        return url
    return f"sqlite:///{Path(url).expanduser().resolve()}"


def _sqlite_pragmas(engine: Engine) -> None:
    """WAL and a busy timeout so that several processes can write; BEGIN IMMEDIATE so writers queue, not fail."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" event below issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _check_classes(row: TaskRow | None, task: str, classes: list[str]) -> None:
    if row is not None and list(row.classes) != list(classes):
        raise ConfigError(f"task {task!r} already has {len(row.classes)} classes from {row.dataset} "
                          f"({', '.join(row.classes[:4])}...); a version with other classes "
                          f"({', '.join(classes[:4])}...) cannot join it: pick another --task name")


class Registry:
    """A registry at ``url`` (default: :func:`default_url`), with adapter files in ``adapter_dir``.

    For SQLite the adapter folder is ``adapters/`` beside the database file; for other URLs it is
    ``$ADAPTKIT_ADAPTER_DIR`` or ``./adapters``.
    """

    def __init__(self, url: str | os.PathLike | None = None, adapter_dir: str | os.PathLike | None = None) -> None:
        self.url = _normalise_url(str(url) if url is not None else default_url())
        try:
            parsed = make_url(self.url)
        except ArgumentError as exc:
            raise RegistryError(f"bad registry URL {self.url!r}: use a path or sqlite:///PATH") from exc
        is_sqlite = parsed.get_backend_name() == "sqlite"
        if is_sqlite and parsed.database and parsed.database != ":memory:":
            db_path = Path(parsed.database).expanduser().resolve()
            if not db_path.parent.is_dir():
                raise RegistryError(f"registry folder {db_path.parent} does not exist: create it or pass another "
                                    "--registry")
            default_dir = db_path.parent / "adapters"
        else:
            default_dir = Path(os.environ.get("ADAPTKIT_ADAPTER_DIR", "adapters")).resolve()
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else default_dir
        self.engine = create_engine(self.url)
        if is_sqlite:
            _sqlite_pragmas(self.engine)
        self._retry(lambda: Base.metadata.create_all(self.engine))

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _retry(self, fn: Any, attempts: int = 5) -> Any:
        """Run ``fn``, retrying a few times if SQLite reports the database locked beyond its busy timeout."""
        for i in range(attempts):
            try:
                return fn()
            except OperationalError as exc:
                if "locked" not in str(exc).lower() or i == attempts - 1:
                    raise RegistryError(f"registry {self.url} is busy or unwritable: {exc.orig}") from exc
                time.sleep(0.2 * (i + 1))

    # -- reading -----------------------------------------------------------------------------------------------

    def tasks(self) -> list[TaskRow]:
        """Every task with its versions and their backbones loaded."""
        with self.session() as s:
            rows = list(s.scalars(select(TaskRow).order_by(TaskRow.name)))
            for t in rows:
                for v in t.versions:
                    _ = v.backbone, v.task
            return rows

    def get_version(self, ref: str) -> VersionRow:
        """The version named by ``task`` (its default) or ``task@N``."""
        name, number = parse_ref(ref)
        with self.session() as s:
            task = s.scalar(select(TaskRow).where(TaskRow.name == name))
            if task is None:
                known = ", ".join(s.scalars(select(TaskRow.name).order_by(TaskRow.name))) or "none yet"
                raise NotFoundError(f"no task {name!r} in the registry (tasks: {known}); train it with "
                                    f"`adaptkit train --task {name} ...`")
            version = task.default if number is None else next((v for v in task.versions if v.version == number), None)
            if version is None:
                have = ", ".join(str(v.version) for v in task.versions) or "none"
                raise NotFoundError(f"task {name!r} has no version {number} (versions: {have})")
            _ = version.backbone, version.task
            return version

    def check_classes(self, task: str, classes: list[str]) -> None:
        """Refuse, before any training, a new version whose classes differ from the task's."""
        with self.session() as s:
            _check_classes(s.scalar(select(TaskRow).where(TaskRow.name == task)), task, classes)

    def path_of(self, version: VersionRow) -> Path:
        return self.adapter_dir / version.file

    # -- writing -----------------------------------------------------------------------------------------------

    def add_version(self, meta: AdapterMeta, state: dict, *, train_info: dict | None = None,
                    make_default: bool = True) -> VersionRow:
        """Write the adapter file and record it as the task's next version, in one transaction.

        Args:
            meta: the adapter's self-description (task, classes, method, backbone, metrics ...).
            state: the adapter's tensors (every one of them trainable: their count is the trainable parameters).
            train_info: training facts: time, images/s, peak memory, device, recipe.
            make_default: make the new version the task's default.
        """
        if not TASK_NAME.match(meta.task):
            raise ConfigError(f"bad task name {meta.task!r}: use letters, digits, '_', '-', '.', up to 64 characters")
        info = dict(train_info or {})
        rel = Path(meta.task) / f"{uuid.uuid4().hex[:12]}.safetensors"
        path = self.adapter_dir / rel
        sha, size = save_adapter(path, state, meta)
        try:
            trainable = sum(t.numel() for t in state.values())
            return self._retry(lambda: self._insert(meta, rel, sha, size, trainable, info, make_default))
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def _insert(self, meta: AdapterMeta, rel: Path, sha: str, size: int, trainable: int, info: dict,
                make_default: bool) -> VersionRow:
        with self.session() as s, s.begin():
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

    def remove(self, ref: str) -> list[str]:
        """Remove a task (every version) or one version ``task@N``; returns the refs removed.

        The rows go in one transaction; the files are deleted only after it commits.
        """
        name, number = parse_ref(ref)
        self.get_version(ref)  # a clear NotFoundError for a missing task or version
        files, removed = [], []

        def _delete() -> None:
            files.clear()
            removed.clear()
            with self.session() as s, s.begin():
                task = s.scalar(select(TaskRow).where(TaskRow.name == name))
                if task is None:
                    raise NotFoundError(f"no task {name!r} in the registry")
                doomed = [v for v in task.versions if number is None or v.version == number]
                for v in doomed:
                    files.append(self.adapter_dir / v.file)
                    removed.append(f"{name}@{v.version}")
                    task.versions.remove(v)
                    s.delete(v)
                if not task.versions:
                    s.delete(task)
                elif not any(v.is_default for v in task.versions):
                    task.versions[-1].is_default = True

        self._retry(_delete)
        for f in files:
            try:
                f.unlink(missing_ok=True)
            except OSError as exc:  # the row is gone; a stray file is harmless but worth a log line
                _log.warning("could not delete %s: %s", f, exc)
        return removed

    def set_default(self, ref: str) -> VersionRow:
        """Make ``task@N`` its task's default version."""
        target = self.get_version(ref)

        def _set() -> None:
            with self.session() as s, s.begin():
                for v in s.scalars(select(VersionRow).where(VersionRow.task_id == target.task_id)):
                    v.is_default = v.id == target.id

        self._retry(_set)
        return self.get_version(f"{target.task.name}@{target.version}")

    # -- moving versions between registries -------------------------------------------------------------------

    def export(self, ref: str, dest: str | os.PathLike, overwrite: bool = False) -> Path:
        """Copy a version's adapter file to ``dest`` after checking it; it describes itself and can be imported."""
        version = self.get_version(ref)
        dest = Path(dest).expanduser()
        if dest.is_dir():
            dest = dest / f"{version.task.name}-v{version.version}.safetensors"
        if dest.exists() and not overwrite:
            raise ConfigError(f"{dest} exists already: pick another path or pass --force to overwrite it")
        load_adapter(self.path_of(version), sha256=version.sha256)  # never export a damaged file
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(self.path_of(version), tmp)
        os.replace(tmp, dest)
        return dest

    def import_file(self, path: str | os.PathLike, task: str | None = None) -> VersionRow:
        """Add an exported adapter file as the next version of its task (or of ``task``)."""
        state, meta = load_adapter(path)
        if task:
            meta.task = task
        return self.add_version(meta, state, train_info={"imported_from": str(Path(path).resolve()),
                                                         **({"recipe": meta.recipe} if meta.recipe else {})})

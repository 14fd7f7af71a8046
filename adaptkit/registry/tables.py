"""The registry's rows: backbones, tasks and adapter versions, as SQLAlchemy 2.0 models.

The column types that read a damaged value back as it is, and what is wrong with a row, are in :mod:`.rows`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from adaptkit.registry.rows import TolerantDateTime as DateTime
from adaptkit.registry.rows import TolerantJSON as JSON
from adaptkit.registry.rows import task_problem, version_problem

__all__ = ["Base", "BackboneRow", "TaskRow", "VersionRow", "Count"]

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
        """Why this row is broken (tampered or damaged), or None: see :mod:`adaptkit.registry.rows`."""
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
        """Why this row is broken (tampered or damaged), or None: see :mod:`adaptkit.registry.rows`."""
        return version_problem(self)

"""Reading a registry: naming a version (``task`` or ``task@N``), finding it, and reading its adapter file.

:class:`Reading` is mixed into :class:`~adaptkit.registry.Registry`; it uses the registry's ``exists``,
``session``, ``location``, ``storage`` and ``_check_creatable``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import joinedload

from adaptkit.artifacts import AdapterMeta, load_adapter, parse_adapter
from adaptkit.errors import ArtifactError, ConfigError, NotFoundError, RegistryError, param, step
from adaptkit.registry.tables import TaskRow, VersionRow
from adaptkit.suggest import did_you_mean

__all__ = ["Reading", "check_task_classes", "parse_ref"]

# a task by name with its versions and their backbones, in one statement built once (its options cost a load 0.3 ms)
_TASK_WITH_VERSIONS = select(TaskRow).where(TaskRow.name == bindparam("name")).options(
    joinedload(TaskRow.versions).joinedload(VersionRow.backbone))

MAX_VERSION_DIGITS = 9  # a task's versions are counted one by one: no task reaches a billion


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``task`` or ``task@version`` -> (task, version or None)."""
    if not isinstance(ref, str):
        raise ConfigError(f"a version is named by a string, TASK or TASK@N, got {ref!r}")
    name, sep, version = ref.partition("@")
    # "²".isdigit() is True, int("²") fails; 5,000 digits exceed int()'s limit, 20 a database integer's
    if sep and not (version.isascii() and version.isdigit() and len(version) <= MAX_VERSION_DIGITS):
        shown = ref if len(ref) <= 80 else f"{ref[:60]}... ({len(ref):,} characters)"
        raise ConfigError(f"bad version in {shown!r}: write TASK or TASK@N with N a version number (at most "
                          f"{MAX_VERSION_DIGITS} digits), e.g. {name[:64]}@1")
    return name, int(version) if sep else None


def _no_task(name: str, known: list[str]) -> str:
    """What to say about a task that is not there: the closest names for a typo, how to train only when none is."""
    hint = did_you_mean(name, known)
    if hint:
        return f"no task {name!r} in the registry: {hint} (tasks: {', '.join(known)})"
    if known:
        return f"no task {name!r} in the registry (tasks: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''})"
    return f"no task {name!r} in the registry, which has no tasks yet: train one with {step('train')}"


def check_task_classes(row: TaskRow | None, task: str, classes: list[str]) -> None:
    if row is not None and list(row.classes) != list(classes):
        raise ConfigError(f"task {task!r} already has {len(row.classes)} classes from {row.dataset} "
                          f"({', '.join(row.classes[:4])}...); a version with other classes "
                          f"({', '.join(classes[:4])}...) cannot join it: pick another {param('task')}")


class Reading:
    """Finding versions and reading their files (see the module's docstring)."""

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
                                f"{step('train', name)} or pass {param('registry')}")
        with self.session() as s:  # one query: the task, its versions and their backbones (a load pays for each)
            task = s.scalars(_TASK_WITH_VERSIONS, {"name": name}).unique().first()
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
            check_task_classes(s.scalar(select(TaskRow).where(TaskRow.name == task)), task, classes)

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

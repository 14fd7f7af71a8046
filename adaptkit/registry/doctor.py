"""Check a registry's rows against its files, and repair what is inconsistent (``adaptkit doctor``).

What it finds: rows that cannot be read (tampered or damaged fields, unsafe file names), versions whose file is
missing or no longer matches its sha256, tasks with no version or no single default, temporary files, adapter files
no row refers to and unfinished S3 uploads (crash leftovers), and files in the adapter folder that adaptkit did not
make. With ``repair``: a bad row whose file is intact is rewritten from the file's own metadata (the file is the
record; the row only indexes it); versions that still cannot be used are removed (their rows; their files when
nothing else refers to them), defaults are set again, empty tasks go, leftovers are deleted or aborted (see
:meth:`Registry.leftovers` for when a file counts as one), and files adaptkit did not make are left alone.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from sqlalchemy import select

from adaptkit.artifacts import parse_adapter
from adaptkit.errors import AdaptkitError, RegistryError
from adaptkit.registry import OWNER_FILE, Registry, TaskRow, VersionRow
from adaptkit.registry.rows import task_problem
from adaptkit.registry.storage import is_own_file, is_temp

__all__ = ["Finding", "diagnose"]


@dataclass
class Finding:
    """One inconsistency: its kind, what it concerns (a ref or a file), why, and whether it was repaired."""

    # bad row | missing file | hash mismatch | no default | empty task | temporary | orphan | upload | foreign
    kind: str
    what: str
    detail: str
    repaired: bool = False
    repairable: bool = True


def diagnose(registry: Registry, *, repair: bool = False, min_age_s: float | None = None) -> list[Finding]:
    """Every inconsistency of ``registry``; with ``repair``, fixed as the module says.

    Args:
        registry: the registry to check.
        repair: fix what is found.
        min_age_s: when a write may be in flight (the adapter folder's lock is held by a writer, or the storage has
            no locks), only files older than this count as leftovers (default: the storage's in-flight time).

    Returns:
        The findings, in the order found; ``repaired`` says which were fixed.
    """
    findings = _versions(registry, repair) + _tasks(registry, repair)
    findings += _files(registry, repair, min_age_s)
    return findings


def _ref(v: VersionRow) -> str:
    name = v.task.name if v.task is not None else f"task#{v.task_id}"
    return f"{name}@{v.version}"


def _versions(registry: Registry, repair: bool) -> list[Finding]:
    found, doomed = [], []
    with registry.session() as s:
        for v in s.scalars(select(VersionRow).order_by(VersionRow.id)):
            _ = v.task, v.backbone
            finding = _version_finding(registry, v)
            if finding is not None:
                found.append(finding)
                doomed.append(v.id)
    if repair and doomed:
        restored = _restore(registry, [i for i, f in zip(doomed, found, strict=True) if f.kind == "bad row"])
        _remove_versions(registry, [i for i in doomed if i not in restored])
        for i, f in zip(doomed, found, strict=True):
            f.repaired = True
            f.detail += "; rewritten from its file" if i in restored else "; removed"
    return found


def _restore(registry: Registry, ids: list[int]) -> set[int]:
    """Rewrite bad version rows (and their task's classes) from their intact files; the ids now good."""
    good = set()
    with registry.session() as s:
        for v in s.scalars(select(VersionRow).where(VersionRow.id.in_(ids))):
            try:
                data = registry.storage.get(v.file)
                state, meta = parse_adapter(data, v.file)
            except (AdaptkitError, OSError):
                continue
            if v.task is None or v.backbone is None or v.task.name != meta.task:
                continue
            if task_problem(v.task):
                v.task.classes, v.task.dataset = list(meta.classes), meta.dataset
            v.method, v.config, v.metrics = meta.method, meta.method_config, meta.metrics
            v.sha256, v.bytes = hashlib.sha256(data).hexdigest(), len(data)
            v.trainable_params = sum(t.numel() for t in state.values())
            v.train = v.train if isinstance(v.train, dict) else {}
            v.train_time_s = v.train_time_s if _number(v.train_time_s) else None
            v.peak_memory_mb = v.peak_memory_mb if _number(v.peak_memory_mb) else None
            v.device = v.device if isinstance(v.device, str) else None
            if v.problem is None:
                good.add(v.id)
        if good == set(ids):
            s.commit()
            return good
    # closed without a commit, so rolled back: a row that cannot be made good is removed whole, not half-rewritten
    return _restore(registry, sorted(good)) if good else set()


def _number(x: object) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _version_finding(registry: Registry, v: VersionRow) -> Finding | None:
    problem = v.problem
    if problem:
        return Finding("bad row", _ref(v), problem)
    try:
        data = registry.storage.get(v.file)
    except FileNotFoundError:
        return Finding("missing file", _ref(v), f"{registry.location_of(v)} is missing")
    except (OSError, RegistryError) as exc:
        return Finding("missing file", _ref(v), f"{v.file} cannot be read: {exc}")
    if hashlib.sha256(data).hexdigest() != v.sha256:
        return Finding("hash mismatch", _ref(v), f"{registry.location_of(v)} does not match its sha256")
    return None


def _remove_versions(registry: Registry, ids: list[int]) -> None:
    files = []
    with registry.transaction() as s:
        for v in s.scalars(select(VersionRow).where(VersionRow.id.in_(ids))):
            files.append(v.file)
            s.delete(v)
    for rel in files:
        try:
            if not registry.referenced(rel):
                registry.storage.delete(rel)
        except (RegistryError, OSError):
            pass  # an unsafe name is never touched; an orphan goes with the next sweep


def _tasks(registry: Registry, repair: bool) -> list[Finding]:
    found = []
    with registry.transaction() as s:
        for t in s.scalars(select(TaskRow).order_by(TaskRow.id)):
            problem = t.problem
            if problem:
                found.append(Finding("bad row", f"task {t.name!r}", problem, repairable=False))
            elif not t.versions:
                found.append(Finding("empty task", str(t.name), "it has no versions", repaired=repair))
                if repair:
                    s.delete(t)
            elif sum(bool(v.is_default) for v in t.versions) != 1:
                found.append(Finding("no default", str(t.name), "it has no single default version",
                                     repaired=repair))
                if repair:
                    for v in t.versions:
                        v.is_default = v is t.versions[-1]
    return found


def _files(registry: Registry, repair: bool, min_age_s: float | None) -> list[Finding]:
    found = []
    with registry.storage.sweeping() as alone:
        age = registry.leftover_age(alone, min_age_s)
        with registry.session() as s:
            referenced = set(s.scalars(select(VersionRow.file)))
        owner = registry.owns_store()
        for f in registry.storage.files():
            if f.rel in referenced or f.rel == OWNER_FILE:
                continue
            if not is_own_file(f.rel):
                found.append(Finding("foreign", f.rel, "not a file adaptkit makes: left alone", repairable=False))
                continue
            kind = "temporary" if is_temp(f.rel) else "orphan"
            if kind == "orphan" and not owner:
                found.append(Finding(kind, f.rel, "the adapter store is shared with another registry (its "
                                                  f"{OWNER_FILE} file names it): left alone", repairable=False))
                continue
            if f.age_s < age:  # else a leftover, as Registry.leftovers counts them
                found.append(Finding(kind, f.rel, _in_flight(f.age_s, age), repairable=False))
                continue
            finding = Finding(kind, f.rel, "a crash leftover" if kind == "temporary" else "no row refers to it")
            if repair:
                registry.storage.delete(f.rel)
                finding.repaired = True
            found.append(finding)
        found += _uploads(registry, repair, age)
    return found


def _in_flight(age_s: float, limit: float) -> str:
    if math.isinf(limit):
        return "a write is in flight (the adapter folder's lock is held), left alone: run doctor again once it is done"
    return f"{age_s:.0f} s old: a write may be in flight, left alone (pass a smaller minimum age to repair it)"


def _uploads(registry: Registry, repair: bool, age: float) -> list[Finding]:
    """Unfinished uploads of adapter files (a writer killed mid-write): the store keeps their parts out of sight."""
    uploads = registry.own_uploads()
    if uploads and not registry.owns_store():
        return [Finding("upload", u.rel, f"unfinished; the adapter store is shared with another registry (its "
                                         f"{OWNER_FILE} file names it): left alone", repairable=False) for u in uploads]
    found = []
    for u in uploads:
        if u.age_s < age:  # else stale, as Registry.stale_uploads counts them
            found.append(Finding("upload", u.rel, f"unfinished, {u.age_s:.0f} s old: a write may be in flight, left "
                                                  "alone (pass a smaller minimum age to repair it)", repairable=False))
            continue
        finding = Finding("upload", u.rel, "unfinished: its writer stopped before the object was complete")
        if repair:
            registry.storage.discard(u)
            finding.repaired = True
        found.append(finding)
    return found

"""Reading registry rows without trusting them.

A tampered or damaged database can hold text where JSON or a date belongs, a string in a number column, a path
where a file name belongs. The column types here hand such values back as they are instead of raising while a
query is read, and :func:`version_problem` says what is wrong with a row, so one bad row is shown as broken and the
others are still listed, compared and served. (The types change nothing in the schema: they render as JSON and
DATETIME.)
"""

from __future__ import annotations

import math
import re
from typing import Any

from sqlalchemy import JSON, DateTime
from sqlalchemy.types import TypeDecorator

from adaptkit.artifacts import TASK_NAME, meta_problem
from adaptkit.errors import RegistryError
from adaptkit.metadata import classes_problem, dataset_problem
from adaptkit.registry.storage import check_rel

__all__ = ["TolerantJSON", "TolerantDateTime", "task_problem", "version_problem"]

_SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")


class _Tolerant(TypeDecorator):
    """The wrapped type's reading, except that a value it cannot read is returned as stored (dates: None)."""

    cache_ok = True
    unreadable: Any = "raw"

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        inner = self.impl_instance.dialect_impl(dialect).result_processor(dialect, coltype)
        if inner is None:
            return None

        def process(value: Any) -> Any:
            try:
                return inner(value)
            except (ValueError, TypeError):
                return value if self.unreadable == "raw" else None

        return process


class TolerantJSON(_Tolerant):
    impl = JSON


class TolerantDateTime(_Tolerant):
    impl = DateTime
    unreadable = None


def _int(x: Any, minimum: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def _optional_number(x: Any) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))


def task_problem(task: Any) -> str | None:
    """What is wrong with a task row (name, classes), or None."""
    if not isinstance(task.name, str) or not TASK_NAME.fullmatch(task.name):
        return f"task name {task.name!r} is not a valid name"
    problem = classes_problem(task.classes)
    if problem:
        return f"its classes are not a list of unique clean names ({problem})"
    problem = dataset_problem(task.dataset)
    return f"its data set name is bad ({problem})" if problem else None


def version_problem(version: Any) -> str | None:
    """What is wrong with a version row (its task, backbone and own fields), or None. Reads no file."""
    task, bb = version.task, version.backbone
    if task is None:
        return "it belongs to no task"
    problem = task_problem(task)
    if problem:
        return problem
    if bb is None:
        return "its backbone row is missing"
    problem = meta_problem({
        "task": task.name, "classes": task.classes, "method": version.method, "method_config": version.config,
        "backbone": bb.name, "backbone_weights": bb.weights, "backbone_fingerprint": bb.fingerprint,
        "backbone_params": bb.num_params, "backbone_dim": bb.embed_dim, "data_config": bb.data_config,
        "metrics": version.metrics,
    })
    if problem:
        return problem
    checks = [
        (_int(version.version, 1), f"version number {version.version!r} is not a positive integer"),
        (_int(version.trainable_params), "trainable_params is not a count"),
        (_int(version.bytes, 1), "bytes is not a size"),
        (isinstance(version.sha256, str) and _SHA256.fullmatch(version.sha256) is not None,
         "sha256 is not 64 hex digits"),
        (isinstance(version.train, dict), "train is not a dict"),
        (_optional_number(version.train_time_s) and _optional_number(version.peak_memory_mb),
         "train_time_s or peak_memory_mb is not a number"),
        (version.device is None or isinstance(version.device, str), "device is not a string"),
    ]
    problem = next((message for ok, message in checks if not ok), None)
    if problem:
        return problem
    try:
        check_rel(version.file)
    except RegistryError:
        return f"its file name {version.file!r} is not a plain name inside the adapter folder"
    return None

"""What each task costs against fully fine-tuning the backbone for it: parameters, bytes, accuracy and time.

Full fine-tuning is computed (the whole backbone plus the task's head, fp32) and, where a ``full`` version of the
task exists, measured too (its file size, accuracy and training time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the formatters below serve the command line, which must not import SQLAlchemy to start
    from adaptkit.registry import Registry, TaskRow, VersionRow

__all__ = ["CostRow", "CostReport", "compare", "format_bytes", "format_count", "format_percent"]

FP32 = 4


@dataclass
class CostRow:
    """One adapter version's costs, beside full fine-tuning of the same task."""

    task: str
    version: int
    default: bool
    method: str
    backbone: str
    trainable_params: int
    share_of_backbone: float  # trainable / backbone parameters
    bytes: int
    test_top1: float | None
    train_time_s: float | None
    peak_memory_mb: float | None
    full_params: int  # backbone + head
    full_bytes: int
    full_test_top1: float | None  # measured, where a `full` version of this task exists
    full_train_time_s: float | None
    full_measured: bool


@dataclass
class CostReport:
    rows: list[CostRow]
    tasks: int
    backbones: int
    backbone_bytes: int  # the weights of every backbone the tasks use, stored once (a resized one is no copy)
    adapters_bytes: int  # the default version of each task
    shared_total_bytes: int  # backbone(s) + one adapter per task
    full_total_bytes: int  # one fully fine-tuned copy per task
    adapters_params: int
    full_total_params: int
    broken: list[str] = field(default_factory=list)  # "task@N: why" for each version left out (bad row)

    @property
    def saving(self) -> float:
        """How many times smaller one backbone plus N adapters is than N full copies."""
        return self.full_total_bytes / self.shared_total_bytes if self.shared_total_bytes else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["saving"] = self.saving
        return out


def format_bytes(n: float | None) -> str:
    """``1.2 MB``: decimal units, as disks and the hub count them; ``-`` for unknown."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_percent(x: float | None) -> str:
    """``91.2%``; ``-`` for unknown."""
    return "-" if x is None else f"{100 * x:.1f}%"


def _full_cost(version: VersionRow, classes: int) -> tuple[int, int]:
    bb = version.backbone
    params = bb.num_params + bb.embed_dim * classes + classes
    return params, params * FP32


def _row(task: TaskRow, v: VersionRow, full: VersionRow | None) -> CostRow:
    full_params, full_bytes = _full_cost(v, len(task.classes))
    return CostRow(
        task=task.name, version=v.version, default=v is task.default, method=v.method, backbone=v.backbone.name,
        trainable_params=v.trainable_params, share_of_backbone=v.trainable_params / max(v.backbone.num_params, 1),
        bytes=v.bytes, test_top1=v.metrics.get("test_top1"), train_time_s=v.train_time_s,
        peak_memory_mb=v.peak_memory_mb,
        full_params=full_params, full_bytes=full.bytes if full else full_bytes,
        full_test_top1=full.metrics.get("test_top1") if full else None,
        full_train_time_s=full.train_time_s if full else None, full_measured=full is not None,
    )


def compare(registry: Registry | str) -> CostReport:
    """Costs of every registered version, and totals over each task's default version.

    Args:
        registry: a :class:`Registry`, or its path or URL.
    """
    from adaptkit.registry import Registry
    from adaptkit.sizes import other_image_size

    if not isinstance(registry, Registry):
        registry = Registry(registry)
    rows, backbones = [], {}
    adapters_bytes = full_total_bytes = adapters_params = full_total_params = 0
    tasks, broken = [], []
    for task in registry.tasks():  # a broken row is reported and left out; it never hides the others
        good = [v for v in task.versions if not v.problem]
        broken.extend(f"{task.name}@{v.version}: {v.problem}" for v in task.versions if v.problem)
        if task.broken:
            if not task.versions or task.problem:
                broken.append(f"task {task.name}: {task.problem or 'it has no versions'}")
            continue
        tasks.append(task)
        full = next((v for v in reversed(good) if v.method == "full" and "blocks" not in v.config), None)
        rows.extend(_row(task, v, full) for v in good)
        default = task.default
        bb, key = default.backbone, (default.backbone.name, default.backbone.weights)
        if key not in backbones or other_image_size(bb.data_config or {}) is None:
            backbones[key] = bb.num_params * FP32  # one stored copy, at its own size, whatever sizes it runs at
        params, size = _full_cost(default, len(task.classes))
        full_total_params += params
        full_total_bytes += full.bytes if full else size
        adapters_params += default.trainable_params
        adapters_bytes += default.bytes
    backbone_bytes = sum(backbones.values())
    return CostReport(rows=rows, tasks=len(tasks), backbones=len(backbones), backbone_bytes=backbone_bytes,
                      adapters_bytes=adapters_bytes, shared_total_bytes=backbone_bytes + adapters_bytes,
                      full_total_bytes=full_total_bytes, adapters_params=adapters_params,
                      full_total_params=full_total_params, broken=broken)


def format_count(n: int | None) -> str:
    """``1.2 M`` / ``311 K`` / ``950`` for parameter counts; ``-`` for unknown."""
    if n is None:
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:,}"

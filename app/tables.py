"""What the page's tables and charts show: a :class:`~adaptkit.compare.CostReport` and predictions, made readable.

Numbers are formatted for people with :mod:`adaptkit.compare`'s helpers (``1.2 M``, ``311.0 KB``, ``93.3%``); the
charts get plain numbers in readable units (KB, MB) so that their axes need no conversion.
"""

from __future__ import annotations

import pandas as pd

from adaptkit.compare import CostReport, CostRow, format_bytes, format_count, format_percent

__all__ = ["ALL_TASKS_COLUMNS", "COST_COLUMNS", "summary", "cost_table", "per_task", "storage", "accuracy",
           "empty_all_tasks"]

ALL_TASKS_COLUMNS = ["task", "method", "top label", "probability", "note"]  # the picker names each backbone
COST_COLUMNS = ["task", "version", "method", "params", "on disk", "test top-1", "full fine-tuning"]


def empty_all_tasks() -> pd.DataFrame:
    return pd.DataFrame(columns=ALL_TASKS_COLUMNS)


def summary(report: CostReport) -> str:
    if not report.tasks:
        return "No tasks yet: train one in **Add a task**, then the costs appear here."
    return (f"**{report.tasks} task(s)** on {report.backbones} backbone(s): "
            f"{format_bytes(report.backbone_bytes)} of backbone + {format_bytes(report.adapters_bytes)} of adapters "
            f"= **{format_bytes(report.shared_total_bytes)}**, against **{format_bytes(report.full_total_bytes)}** "
            f"for {report.tasks} fully fine-tuned copies: **{report.saving:.1f}x smaller**. Trainable parameters: "
            f"{format_count(report.adapters_params)} against {format_count(report.full_total_params)}.")


def _full(r: CostRow) -> str:
    """Full fine-tuning of the same task in one cell: measured where a ``full`` version exists, else computed."""
    size = f"{format_count(r.full_params)} params, {format_bytes(r.full_bytes)}"
    return f"{size}, {format_percent(r.full_test_top1)}" if r.full_measured else f"{size} (computed)"


def cost_table(report: CostReport) -> pd.DataFrame:
    """One row per version (the default one starred): parameters with their share of the backbone, bytes, accuracy."""
    rows = [[r.task, f"{r.version}{' *' if r.default else ''}", r.method,
             f"{format_count(r.trainable_params)} ({100 * r.share_of_backbone:.2f}%)", format_bytes(r.bytes),
             format_percent(r.test_top1), _full(r)] for r in report.rows]
    return pd.DataFrame(rows, columns=COST_COLUMNS)


def _defaults(report: CostReport) -> list[CostRow]:
    return [r for r in report.rows if r.default]


def per_task(report: CostReport, field: str, name: str, scale: float = 1.0) -> pd.DataFrame:
    """One bar per task (its default version): ``field`` divided by ``scale``, in a column called ``name``."""
    rows = [{"task": r.task, name: getattr(r, field) / scale, "method": r.method} for r in _defaults(report)]
    return pd.DataFrame(rows, columns=["task", name, "method"])


def storage(report: CostReport) -> pd.DataFrame:
    shared = f"1 backbone + {report.tasks} adapters"
    full = f"{report.tasks} full copies"
    rows = [(shared, "backbone", report.backbone_bytes / 1e6), (shared, "adapters", report.adapters_bytes / 1e6),
            (full, "full copies", report.full_total_bytes / 1e6)]
    return pd.DataFrame(rows if report.tasks else [], columns=["setup", "part", "MB"])


def accuracy(report: CostReport) -> pd.DataFrame:
    """Test accuracy (%) against trainable parameters (K) of the versions the bar charts show, labelled by task."""
    rows = [{"trainable params (K)": r.trainable_params / 1e3, "test top-1 (%)": 100 * r.test_top1, "task": r.task,
             "method": r.method} for r in _defaults(report) if r.test_top1 is not None]
    return pd.DataFrame(rows, columns=["trainable params (K)", "test top-1 (%)", "task", "method"])

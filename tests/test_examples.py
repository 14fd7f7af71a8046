"""The examples run as a user would run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_continual_tasks_leave_the_first_task_unchanged():
    result = subprocess.run([sys.executable, str(EXAMPLES / "continual_tasks.py"), "--epochs", "1",
                             "--limit-train", "128"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("unchanged") == 3
    assert "CHANGED" not in result.stdout


def test_class_incremental_benchmark_runs_and_reports_consistent_metrics(cifar_mini, tmp_path):
    """CIFAR-10-mini in 2 tasks of 5 classes, 1 epoch: the printed table and the JSON report say the same, and
    the metrics obey their definitions (one task routes to itself; no task given never beats the task given)."""
    out = tmp_path / "reports.json"
    result = subprocess.run([sys.executable, str(EXAMPLES / "class_incremental.py"), "--dataset",
                             f"folder:{cifar_mini}", "--tasks", "2", "--epochs", "1", "--limit-train", "40",
                             "--limit-eval", "20", "--rank", "4", "--routers", "lda", "ncm",
                             "--registry", str(tmp_path / "registry.db"), "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained t0-0-4" in result.stdout and "trained t1-5-9" in result.stdout
    reports = json.loads(out.read_text())
    assert list(reports) == ["lda", "ncm"]
    for router, r in reports.items():
        assert r["tasks"] == ["t0-0-4@1", "t1-5-9@1"] and r["images"] == [20, 20]
        assert r["task_id"][0] == 1.0 and r["cil"][0] == r["til"][0]  # one task: routing is free
        assert all(c <= min(t, g) for c, t, g in zip(r["cil"], r["task_id"], r["til"], strict=True))
        assert r["matrix"][0][1] is None and r["matrix"][1][0] is not None
        assert r["final"] == r["cil"][-1]
        row = f"| {router} | {100 * r['task_id'][-1]:.1f} | {100 * r['final']:.1f} |"
        assert row in result.stdout
    # the same images and adapters under every router: what does not route is equal
    assert reports["lda"]["til"] == reports["ncm"]["til"]
    assert reports["lda"]["simplecil"] == reports["ncm"]["simplecil"]

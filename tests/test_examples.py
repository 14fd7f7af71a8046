"""The examples run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_continual_tasks_leave_the_first_task_unchanged():
    result = subprocess.run([sys.executable, str(EXAMPLES / "continual_tasks.py"), "--epochs", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("unchanged") == 3
    assert "CHANGED" not in result.stdout

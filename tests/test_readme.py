"""The README's quickstart runs as written, offline, in a fresh folder (shortened by a few appended options)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SHORT = ["--epochs", "1", "--limit-train", "64", "--limit-eval", "32"]  # appended to each `train`: seconds, not minutes


def quickstart_commands() -> list[list[str]]:
    """The `adaptkit ...` lines of the first bash block under "## Quickstart"."""
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's quickstart has no bash block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.startswith("adaptkit ")]


def _run(argv: list[str], cwd: Path) -> str:
    exe = shutil.which("adaptkit")
    cmd = [exe, *argv[1:]] if exe else [sys.executable, "-m", "adaptkit.cli", *argv[1:]]
    env = {**os.environ, "COLUMNS": "100", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}"
    return result.stdout


def test_quickstart_runs_as_written(tmp_path):
    commands = quickstart_commands()
    assert [c[1] for c in commands] == ["train", "train", "list", "show", "compare"]
    outputs = [_run(c + SHORT if c[1] == "train" else c, tmp_path) for c in commands]
    assert (tmp_path / "registry.db").is_file() and (tmp_path / "adapters").is_dir()  # where the README says
    listing, shown, compared = outputs[2:]
    assert "digits" in listing and "digits-probe" in listing
    assert "adapter" in shown and "lr" in shown  # the recipe, shown
    assert "digits-probe" in compared and "full fine-tuning" in compared.lower()

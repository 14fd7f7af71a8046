"""The GPU script (benchmarks/gpu/run.py) runs here first: ``--device cpu --tiny`` goes through every part's code path
with tiny ViTs, so that the run on a lent GPU is the second run of code that already works.

One run of the whole script (about 5 minutes on a busy 2-core machine, every part its own process; the time limits
doubled for such a machine); the tests read its report: every part ran, every asserted check passed for every method,
every table the GPU run is for has its rows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("gpu") / "report.md"
    missing = out.parent / "no-such-archive.tar.gz"  # the torchrun part makes synthetic JPEGs, as on a GPU machine
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "run.py"), "--device", "cpu",
                             "--tiny", "--time-factor", "2", "--cifar", str(missing), "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=1500)
    assert out.is_file(), result.stderr[-3000:]
    text = out.read_text()
    assert result.returncode == 0, text + result.stderr[-3000:]
    return text


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table after ``heading``."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[start + 2:end]]


def test_every_part_ran(report):
    parts = {r[0]: r[1] for r in _table(report, "## Parts")}
    assert parts == dict.fromkeys(["correctness", "torchrun", "inference", "serving", "training throughput"], "ok")
    assert "- card (nvidia-smi):" in report and re.search(r"torch \S+ .*timm \S+", report)


def test_every_check_passed_for_every_method(report):
    checks = _table(report, "## Checks")
    assert checks and all(r[-1] == "pass" for r in checks), [r for r in checks if r[-1] != "pass"]
    subjects = {(r[1], r[2].split(" ")[0]) for r in checks}
    for method in ("adapter", "lora", "ssf", "bitfit", "vpt", "linear", "full"):
        assert ("mixed batch = alone", method) in subjects
        assert ("routed = task given", method) in subjects
        assert ("trained, saved, loaded = in memory", method) in subjects
    for method in ("lora", "ssf", "bitfit"):
        assert ("merged = unmerged", method) in subjects
    names = {r[1] for r in checks}
    assert {"fingerprint on the device", "ONNX = adaptkit", "route on the device = on the CPU",
            "trained through DDP", "version registered"} <= names


def test_every_figure_was_measured(report):
    train = _table(report, "### training throughput")
    assert {(r[0], r[2]) for r in train} == {(m, c) for m in ("adapter r64", "lora r8", "full", "peft lora r8")
                                            for c in ("eager", "aot_eager")}
    assert all(float(r[3].replace(",", "")) > 0 for r in train), train
    inference = [r[0] for r in _table(report, "### inference")]
    assert inference[:2] == ["bare backbone", "one task (adapter r64)"] and len(inference) == 6
    assert len(_table(report, "### serving through AdapterCache")) == 2
    assert "synthetic JPEGs" in report  # no archive given: the fallback a GPU machine without ../shared takes
    # torchrun --nproc_per_node 1 joins a process group and trains through DDP, as many processes do (the only way
    # a one-GPU machine runs DDP's code path on NCCL); the row records the backend and the world size
    torchrun = {r[0]: r[1] for r in _table(report, "### torchrun --nproc_per_node 1")}
    assert "DDP backend gloo, world size 1" in torchrun["device"], torchrun

"""Start-up time of the command line: ``adaptkit --help`` and ``adaptkit list`` beside ``python -c pass``.

Each command runs in a fresh interpreter, round-robin (one run of each per round), so a slow spell on a shared
machine hits them all alike; the table shows the median wall time. ``import torch`` is shown for scale: it is what
every command paid before the CLI imported lazily. Targets: ``--help`` under 0.5 s, ``list`` under 1.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS_S = {"adaptkit --help": 0.5, "adaptkit list": 1.5}


def commands(registry: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "adaptkit.cli"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "adaptkit --help": [*cli, "--help"],
        "adaptkit list": [*cli, "list", "--registry", str(registry)],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    }


def wall_time(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs of each command (median reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(Path(tmp) / "registry.db")
        for argv in cmds.values():  # warm the file cache once
            wall_time(argv)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.repeats):
            for name, argv in cmds.items():
                times[name].append(wall_time(argv))
    base = statistics.median(times["python -c pass"])
    print("| command | median s | over `python -c pass` s | target s |\n| --- | ---: | ---: | ---: |")
    for name, ts in times.items():
        med = statistics.median(ts)
        target = TARGETS_S.get(name)
        print(f"| `{name}` | {med:.2f} | {med - base:.2f} | {f'< {target}' if target else '-'} |")


if __name__ == "__main__":
    main()

"""Every GPU path of adaptkit in one run, one Markdown report: correctness on the device, training throughput,
inference and serving speed, and ``torchrun`` through the real training entry point.

Each part runs in its own process under its own time limit (and the run's whole budget), so a part that fails or
hangs costs that part alone: the report says which, and what it had measured before it stopped. ``--device cpu
--tiny`` runs the same code paths with tiny ViTs and a few steps (the test suite does, in about a minute), so a GPU
run is the second run of code that already works.

Usage (on a lent GPU, from the repository root; see benchmarks/README.md)::

    python benchmarks/gpu/run.py --out $OUT/report.md
    python benchmarks/gpu/run.py --device cpu --tiny --out /tmp/report.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for path in (REPO, HERE.parent, HERE.parent / "speed", HERE.parent / "serving", HERE):  # adaptkit, common, benches
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# part -> (module, function, seconds allowed in a full run, in a tiny run); run in this order
# (the training throughput last: its compiled rows, the likeliest to run long, are what the run's budget cuts)
PARTS: dict[str, tuple[str, str, int, int]] = {
    "correctness": ("correctness", "run", 100, 180),
    "torchrun": ("ddp", "run", 90, 120),
    "inference": ("inference", "run_inference", 150, 40),
    "serving": ("inference", "run_serving", 90, 40),
    "training throughput": ("throughput", "run", 220, 180),
}
BUDGET_S = {False: 470, True: 720}  # the whole run: under 8 minutes on the GPU; tiny: a busy CPU's time


@dataclass
class Context:
    """What a part is given: where it runs, how big, a folder shared by the parts of this run, and its sink."""

    device: str
    tiny: bool
    work: Path
    cifar: Path | None
    sink: Sink

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def random_weights(self, name: str) -> Path:
        """A file of timm's random initialisation of ``name``, made once per run: ``create_backbone(name,
        weights=file)`` reads it in seconds, where adaptkit's seeded random weights take a minute for ViT-B."""
        path = self.work / f"{name}.safetensors"
        if not path.is_file():
            import timm
            from safetensors.torch import save_file

            state = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
            save_file({k: v.contiguous() for k, v in state.items()}, str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").replace(path)
        return path


class Sink:
    """A part's results (tables, asserted checks), written to a JSON file after every addition, so what a part
    measured before it failed or ran out of time still reaches the report."""

    def __init__(self, path: Path) -> None:
        self.path, self.tables, self.checks = path, [], []

    def table(self, title: str, headers: list[str], rows: list[list], note: str = "") -> None:
        """Add a table, or replace the one of the same title (a table grown row by row)."""
        table = {"title": title, "headers": headers, "rows": [[str(c) for c in r] for r in rows], "note": note}
        self.tables = [t for t in self.tables if t["title"] != title] + [table]
        self._save()

    def check(self, name: str, subject: str, tolerance: str, found: str, passed: bool) -> None:
        """One asserted check: ``found`` (a difference, a fingerprint ...) against ``tolerance``."""
        self.checks.append({"check": name, "subject": subject, "tolerance": tolerance, "found": found,
                            "passed": bool(passed)})
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tables": self.tables, "checks": self.checks}))
        tmp.replace(self.path)


def run_part(name: str, args: argparse.Namespace) -> None:
    """In the child process: run one part; exit 1 if one of its checks failed."""
    import importlib

    module, function, _, _ = PARTS[name]
    sink = Sink(Path(args.result))
    ctx = Context(args.device, args.tiny, Path(args.work), Path(args.cifar) if args.cifar else None, sink)
    getattr(importlib.import_module(module), function)(ctx)
    failed = [c for c in sink.checks if not c["passed"]]
    if failed:
        raise SystemExit(f"{len(failed)} check(s) failed: " + "; ".join(f"{c['check']} ({c['subject']})"
                                                                       for c in failed))


def spawn(name: str, args: argparse.Namespace, work: Path, limit: float) -> dict:
    """Run part ``name`` in a child process for at most ``limit`` seconds; its results and how it ended."""
    result = work / f"{name.replace(' ', '_')}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--result", str(result), "--work",
           str(work), "--device", args.device, *(["--tiny"] if args.tiny else []),
           *(["--cifar", str(args.cifar)] if args.cifar else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    # a session of its own: on time-out the whole group goes (torchrun's workers, data loaders, compile workers),
    # not only the child, so nothing of a part runs on beside the next; what it wrote to its sink stays
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        _, log = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else "FAILED"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, log = proc.communicate()
        status = f"TIMED OUT after {limit:.0f} s"
    seconds = time.perf_counter() - start
    out = json.loads(result.read_text()) if result.is_file() else {"tables": [], "checks": []}
    error = "" if status == "ok" else _last_lines(log)
    print(f"[{name}] {status} in {seconds:.0f} s" + (f"\n{error}" if error else ""), file=sys.stderr, flush=True)
    return {"name": name, "status": status, "seconds": seconds, "limit": limit, "error": error, **out}


def _last_lines(text: str, count: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-count:])


def environment(device: str) -> list[str]:
    """The lines that say where the figures come from: the card (nvidia-smi), the libraries, the commit."""
    import timm
    import torch

    card = "no GPU (nvidia-smi not found)"
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True)
        card = smi.stdout.strip() or smi.stderr.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO) \
        if shutil.which("git") else None
    return [f"- card (nvidia-smi): {card}",
            f"- device used: {device}" + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else
                                          f" ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)"),
            f"- torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}, "
            f"{', '.join(f'{n} {_version(n)}' for n in ('peft', 'onnxruntime', 'sqlalchemy'))}, "
            f"Python {platform.python_version()}",
            f"- adaptkit commit: {commit and commit.stdout.strip() or 'unknown (no git here)'}",
            f"- run at {datetime.now(timezone.utc).isoformat(timespec='seconds')}"]


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def report(parts: list[dict], args: argparse.Namespace, total: float) -> str:
    mode = "tiny (a tiny ViT, a few steps: the code paths, not the figures)" if args.tiny else "full"
    lines = ["# adaptkit on the device: every GPU path, one run", "", *environment(args.device),
             f"- mode: {mode}; whole run {total:.0f} s (budget {BUDGET_S[args.tiny] * args.time_factor:.0f} s)", "",
             "## Parts", ""]
    lines += markdown_table(["part", "status", "seconds", "limit s"],
                            [[p["name"], p["status"], f"{p['seconds']:.0f}", f"{p['limit']:.0f}"] for p in parts])
    checks = [[p["name"], c["check"], c["subject"], c["tolerance"], c["found"], "pass" if c["passed"] else "FAIL"]
              for p in parts for c in p["checks"]]
    lines += ["", "## Checks", "", "Relative difference: max |a - b| / max |b| over the logits compared.", ""]
    lines += markdown_table(["part", "check", "subject", "tolerance", "found", "result"], checks)
    for p in parts:
        lines += ["", f"## {p['name']}", ""]
        if p["status"] != "ok":
            lines += [f"{p['status']}" + (":" if p["error"] else " (its output is silent)"), ""]
            lines += ["```", p["error"], "```", ""] if p["error"] else []
        for t in p["tables"]:
            lines += [f"### {t['title']}", ""] + ([t["note"], ""] if t["note"] else [])
            lines += markdown_table(t["headers"], t["rows"]) + [""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-report.md"), help="the Markdown report to write")
    parser.add_argument("--device", default=None, help="cuda or cpu [default: cuda when there is one]")
    parser.add_argument("--tiny", action="store_true", help="tiny ViTs and a few steps: the same code paths, fast")
    parser.add_argument("--cifar", type=Path, default=None, help="CIFAR-10 JPEG archive for the torchrun part "
                        "[default: benchmarks/gpu/cache/cifar10.tar.gz, else ../shared/data/cifar10.tar.gz, else "
                        "synthetic JPEGs]")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="run only these")
    parser.add_argument("--time-factor", type=float, default=1.0, help="multiply every time limit and the budget "
                        "by this (a busy machine)")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # in a child process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.part:
        run_part(args.part, args)
        return
    started, parts = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="adaptkit-gpu-") as tmp:
        for name in args.parts:
            left = BUDGET_S[args.tiny] * args.time_factor - (time.perf_counter() - started)
            limit = min(PARTS[name][3 if args.tiny else 2] * args.time_factor, max(left, 10))
            parts.append(spawn(name, args, Path(tmp), limit))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(parts, args, time.perf_counter() - started))
    print(f"wrote {args.out}", file=sys.stderr)
    if any(p["status"] != "ok" for p in parts):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

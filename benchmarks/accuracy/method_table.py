"""The method table: every method in ``adaptkit.methods.METHODS`` with the same budget on the three offline data sets.

    python benchmarks/accuracy/method_table.py                    # all rows; rows already in the JSON file are reused
    python benchmarks/accuracy/method_table.py --only adapter     # one method's rows (re)computed if missing
    python benchmarks/accuracy/method_table.py --fresh            # ignore the saved rows
    python benchmarks/accuracy/method_table.py --print            # the table of the saved rows, nothing trained
    OMP_NUM_THREADS=1 python benchmarks/accuracy/method_table.py --jobs 2   # two rows at once, one thread each

Each row is (data set, method, settings): the packaged backbone and the default recipe (``TrainConfig()``: 10 epochs,
batch 64, light augmentation, seed 0, the method's default learning rate), the same for every method. A method
that is not in :data:`CONFIGS` runs with its default settings, so a new method appears in the table with no change
here. Every finished row is saved at once to a JSON file
(``benchmarks/results/method_table.json``), so an interrupted run resumes where it stopped and a rerun after new
methods are added trains only their rows. Prints a Markdown table and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from adaptkit.compare import format_bytes, format_percent
from adaptkit.methods import METHODS
from adaptkit.models import PACKAGED_BACKBONE
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, train

RESULTS = Path(__file__).resolve().parents[1] / "results" / "method_table.json"
HALF = "half"  # a ``blocks`` value resolved to half the backbone's depth
# Settings per method; a method not named here runs once with its defaults.
CONFIGS: dict[str, list[dict[str, Any]]] = {
    "adapter": [{}, {"blocks": HALF}, {"placement": "adapterplus"}],
}
BUDGET: dict[str, Any] = {}  # TrainConfig's defaults: every method trains with the recipe a user gets


def resolve(config: dict[str, Any], depth: int) -> dict[str, Any]:
    """``blocks: "half"`` -> half the backbone's depth."""
    return {k: (depth // 2 if v == HALF else v) for k, v in config.items()}


def row_key(dataset: str, method: str, config: dict[str, Any]) -> str:
    return f"{dataset}|{method}|{json.dumps(config, sort_keys=True)}"


def label(method: str, config: dict[str, Any], depth: int) -> str:
    parts = [f"{k}={v}" for k, v in config.items() if k != "blocks"]
    if "blocks" in config:
        parts.append(f"last {config['blocks']} of {depth} blocks")
    return method + (f" ({', '.join(parts)})" if parts else "")


def run_row(job: tuple[str, str, str, dict[str, Any], int]) -> tuple[str, dict[str, Any]]:
    """Train one row in a temporary registry on ``threads`` torch threads; returns (its key, its figures)."""
    name, spec, method, config, threads = job
    torch.set_num_threads(threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(spec, task=f"{name}-{method}", backbone=PACKAGED_BACKBONE, method=method,
                       method_config=config, config=TrainConfig(threads=threads, **BUDGET),
                       registry=Registry(Path(tmp) / "registry.db"))
    v = result.version
    return row_key(name, method, config), {
        "test_top1": result.metrics["test_top1"], "trainable_params": v.trainable_params, "bytes": v.bytes,
        "train_time_s": v.train_time_s, "wall_s": time.perf_counter() - started, "device": v.device,
        "recipe": {k: v.train["recipe"].get(k) for k in ("lr", "epochs", "batch_size", "augment", "warmup_epochs")}}


def reuse(log: Path, rows: dict[str, Any]) -> None:
    """Take the rows that ``recipe_table.py`` already trained (a method at its defaults, at this budget's recipe)."""
    from recipe_table import same_run  # beside this script, in accuracy/

    for line in (json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")):
        same = same_run(line, (line["dataset"], "", line["method"], None, BUDGET))
        key = row_key(line["dataset"], line["method"], {})
        if same and "trainable_params" in line and key not in rows:
            rows[key] = {"test_top1": line["test_top1"] / 100, "wall_s": line["seconds"], "reused_from": log.name,
                         **{k: line[k] for k in ("trainable_params", "bytes", "train_time_s", "device")}}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, rows: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def table(rows: dict[str, Any], plan: list[tuple[str, str, dict[str, Any]]], depth: int) -> str:
    lines = ["| data set | method | test top-1 | trainable parameters | file | train time |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, method, config in plan:
        r = rows.get(row_key(name, method, config))
        if r is None:
            continue
        lines.append(f"| {name} | {label(method, config, depth)} | {format_percent(r['test_top1'])} | "
                     f"{r['trainable_params']:,} | {format_bytes(r['bytes'])} | {r['train_time_s']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="methods to run (default: every registered one)")
    parser.add_argument("--datasets", nargs="*", default=None, help="digits, glyphs, cifar5 (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON file of finished rows")
    parser.add_argument("--fresh", action="store_true", help="recompute every row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="recipe_table.py's --resume log: its runs of a method at its defaults become rows")
    parser.add_argument("--jobs", type=int, default=1, help="rows trained at once, each in its own process")
    parser.add_argument("--print", action="store_true", help="print the table of the saved rows, train nothing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
    from common.data import specs  # benchmarks/common/data.py
    from timm import create_model

    depth = len(create_model(PACKAGED_BACKBONE.split(".")[0]).blocks)
    data = {k: v for k, v in specs().items() if args.datasets is None or k in args.datasets}
    methods = [m for m in METHODS if args.only is None or m in args.only]
    plan = [(name, m, resolve(c, depth)) for name in data for m in methods for c in CONFIGS.get(m, [{}])]
    per_set = len(plan) // max(1, len(data))
    rows = {} if args.fresh else load(args.results)
    if args.reuse and args.reuse.is_file():
        reuse(args.reuse, rows)
    if args.print:
        plan = [p for p in plan if row_key(*p) in rows]
    # trained method by method (a stable sort on the row's place within its data set), so a stopped run has whole
    # methods on every data set
    place = {row_key(*row): i % per_set for i, row in enumerate(plan)}
    todo = sorted(((name, data[name], method, config, args.threads) for name, method, config in plan
                   if row_key(name, method, config) not in rows), key=lambda job: place[row_key(*job[:1], *job[2:4])])
    with get_context("spawn").Pool(args.jobs) as pool:  # one process per row: a row's threads are its own
        for key, row in pool.imap_unordered(run_row, todo):
            rows[key] = row
            save(args.results, rows)  # every finished row at once: a stopped run resumes here
            print(f"{key}: test top-1 {format_percent(row['test_top1'])}, {row['train_time_s']:.0f} s", flush=True)
    cfg = TrainConfig(**BUDGET)
    print(f"\n{PACKAGED_BACKBONE}, {cfg.epochs} epochs, batch {cfg.batch_size}, augment {cfg.augment}, "
          f"seed {cfg.seed}, each method at its default learning rate, {args.threads} thread(s); "
          f"`python benchmarks/accuracy/method_table.py`\n")
    print(table(rows, plan, depth))


if __name__ == "__main__":
    main()

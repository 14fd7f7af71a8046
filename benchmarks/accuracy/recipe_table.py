"""Do the default recipes work without tuning? Accuracy of the defaults and of an adapter learning-rate sweep.

For each real offline data set of a different kind (``benchmarks/common/data.py``: handwritten digits, letters rendered
from unseen fonts, five CIFAR-10 classes, and with ``--datasets ... emoji`` the Unicode group of unseen emoji) on the
packaged backbone, it trains the linear probe, the adapter and LoRA with nothing but ``--dataset``/``--backbone``
(every other setting at its default), then the adapter at each learning rate of a sweep around its default, and
prints a Markdown table of test top-1. The goal: the default adapter beats the default linear probe by at least 5
points and is within 2 points of the sweep's best.

Usage (runs take minutes each on one CPU thread; ``--jobs`` runs several at once, one thread each)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy/recipe_table.py --jobs 4
    # a finer grid, and --lr auto:
    python benchmarks/accuracy/recipe_table.py --datasets digits --factors 0.25 0.5 1 2 4 --auto

Runs go defaults first, data set by data set, so a stopped run still has the rows that matter most; every finished
run is printed to stderr as a JSON line, and appended to ``--resume FILE``, whose runs at the same recipe are not
trained again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import print_table  # noqa: E402
from common.data import specs  # noqa: E402

BACKBONE = "vit_cifar_tiny_patch4_32.adaptkit_c10"
SWEEP = (1 / 3, 1.0, 3.0)  # multiples of the adapter's default learning rate: a half-decade grid


def run(job: tuple[str, str, str, float | str | None, dict]) -> dict:
    """Train one configuration in this (worker) process on one thread; returns its test top-1 and recipe."""
    from adaptkit.training import TrainConfig, train

    dataset, spec, method, lr, extra = job
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(spec, task="t", backbone=BACKBONE, method=method, registry=f"{tmp}/registry.db",
                       config=TrainConfig(lr=lr, threads=1, **extra))
    recipe = result.version.train["recipe"]
    return {"dataset": dataset, "method": method, "lr_given": lr, "lr": recipe["lr"], "recipe": recipe,
            "augment": recipe["augment"], "epochs": recipe["epochs"], "limit_train": recipe["limit_train"],
            "seed": recipe["seed"],
            "trainable_params": result.version.trainable_params, "bytes": result.version.bytes,
            "train_time_s": result.version.train_time_s, "device": result.version.device,
            "test_top1": 100 * result.metrics["test_top1"], "seconds": time.perf_counter() - started}


def same_run(line: dict, job: tuple) -> bool:
    """Whether a logged run trained as this job would: same data set, method, learning rate as used (a default
    that moved to a rate already run by hand is that run) and recipe; older logs lack the recipe fields."""
    from adaptkit.training import TrainConfig

    dataset, _, method, lr, extra = job
    cfg = TrainConfig(**extra)
    if lr == "auto" or line.get("lr_given") == "auto":
        return False
    used = lr if lr is not None else cfg.resolved(method).lr
    return (line.get("dataset"), line.get("method")) == (dataset, method) and math.isclose(line["lr"], used) and \
        (line.get("augment"), line.get("epochs"), line.get("limit_train"), line.get("seed", 0)) == (
            cfg.augment, cfg.epochs, cfg.limit_train, cfg.seed)


def jobs(datasets: dict[str, str], factors: list[float], auto: bool, extra: dict,
         methods: tuple[str, ...] = ("linear", "adapter", "lora")) -> list[tuple]:
    """Every (data set, method, lr) to train: the defaults of ``methods``, the adapter sweep, and --lr auto if
    asked."""
    from adaptkit.training import TrainConfig

    default = TrainConfig(**extra).resolved("adapter").lr
    runs = [("linear", None), ("adapter", None), *(("adapter", default * f) for f in factors if f != 1.0),
            ("lora", None), *([("adapter", "auto")] if auto else [])]
    return [(name, spec, method, lr, extra) for method, lr in runs for name, spec in datasets.items()
            if method in methods]


def _cell(value: float | None, sign: str = "") -> str:
    return "-" if value is None else f"{value:{sign}.1f}"


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _mean(results: list[dict]) -> list[dict]:
    """One row per (data set, method, rate as given), its test top-1 the mean over the seeds run."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["method"], r["lr_given"], round(r["lr"], 12)), []).append(r)
    return [{**runs[0], "test_top1": sum(r["test_top1"] for r in runs) / len(runs)} for runs in groups.values()]


def table(results: list[dict], datasets: list[str]) -> None:
    """The Markdown table; with several seeds run, every cell is their mean."""
    rows, results = [], _mean(results)
    for name in datasets:
        mine = [r for r in results if r["dataset"] == name]
        linear, adapter, lora, auto = (next((r["test_top1"] for r in mine if r["method"] == m and r["lr_given"] == lr),
                                            None) for m, lr in (("linear", None), ("adapter", None), ("lora", None),
                                                                ("adapter", "auto")))
        sweep = sorted((r for r in mine if r["method"] == "adapter" and r["lr_given"] != "auto"), key=lambda r: r["lr"])
        best = max((r["test_top1"] for r in sweep), default=None)
        auto_lr = next((r["lr"] for r in mine if r["lr_given"] == "auto"), None)
        rows.append([name, _cell(linear), _cell(adapter), _cell(lora),
                     ", ".join(f"{r['lr']:.2g}: {r['test_top1']:.1f}" for r in sweep),
                     _cell(_minus(adapter, linear), "+"), _cell(_minus(adapter, best), "+"),
                     f"{auto:.1f} (lr {auto_lr:.2g})" if auto else "-"])
    print_table(["data set", "linear", "adapter", "LoRA", "adapter lr sweep (lr: top-1)", "adapter - linear",
                 "adapter - best lr", "adapter --lr auto"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "glyphs", "cifar5"])
    parser.add_argument("--factors", nargs="+", type=float, default=list(SWEEP),
                        help="adapter learning rates to sweep, as multiples of its default")
    parser.add_argument("--auto", action="store_true", help="also train the adapter with --lr auto")
    parser.add_argument("--epochs", type=int, default=None, help="override the default epochs (say so in the table)")
    parser.add_argument("--limit-train", type=int, default=None, help="use only N training images (say so)")
    parser.add_argument("--augment", default=None, help="override the default augmentation level (say so)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="train every run at each of these seeds (default: the default seed, 0) and print means")
    parser.add_argument("--methods", nargs="+", default=["linear", "adapter", "lora"],
                        help="train only these of the defaults (the sweep is the adapter's)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once, one CPU thread each")
    parser.add_argument("--from-log", type=Path, default=None,
                        help="print the table from the JSON lines of an earlier (possibly stopped) run's stderr")
    parser.add_argument("--resume", type=Path, default=None,
                        help="a JSON-lines log: runs already in it (same recipe) are reused, new ones appended")
    args = parser.parse_args()
    from adaptkit.training import TrainConfig

    extra = {k: v for k, v in (("epochs", args.epochs), ("limit_train", args.limit_train), ("augment", args.augment))
             if v is not None}
    seeds = args.seeds or [TrainConfig().seed]
    if args.from_log:
        results = [json.loads(line) for line in args.from_log.read_text().splitlines() if line.startswith("{")]
        names = [n for n in args.datasets if any(r["dataset"] == n for r in results)]
    else:
        chosen = {k: v for k, v in specs(emoji="emoji" in args.datasets).items() if k in args.datasets}
        names = list(chosen)
        logged = [json.loads(x) for x in args.resume.read_text().splitlines() if x.startswith("{")] \
            if args.resume and args.resume.is_file() else []
        todo, results = [], []
        every = [job for seed in seeds for job in jobs(chosen, args.factors, args.auto, {**extra, "seed": seed},
                                                        tuple(args.methods))]
        for job in every:
            done = next((line for line in logged if same_run(line, job)), None)
            if done:
                results.append({**done, "lr_given": job[3]})  # as this job names it (None: the default)
            else:
                todo.append(job)
        with get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(run, todo):
                results.append(r)
                line = json.dumps({k: v for k, v in r.items() if k != "recipe"})
                print(line, file=sys.stderr, flush=True)
                if args.resume:
                    with args.resume.open("a") as log:
                        log.write(line + "\n")
    cfg = TrainConfig(**extra)
    print(f"{BACKBONE}; test top-1 (%); {cfg.epochs} epochs, batch {cfg.batch_size}, augment {cfg.augment}, "
          + (f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of seeds {', '.join(map(str, seeds))}")
          + ", one CPU thread per run"
          + (f"; only {args.limit_train} training images" if args.limit_train else "") + "\n")
    table(results, names)


if __name__ == "__main__":
    main()

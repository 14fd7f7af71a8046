"""Work that training skips: cached frozen features for the linear probe, and adapters in the last half of the blocks.

    python benchmarks/speed/bench_skip.py probe     # linear probe, 10 epochs, no augmentation: cached against uncached
    python benchmarks/speed/bench_skip.py blocks    # adapter r=64 in every block against the last half: step and memory

``probe`` times the whole ``train()`` call (backbone, data, epochs, test, file and row) on the packaged backbone and
``digits``, both ways, in one process. ``blocks`` runs each case in a fresh subprocess (as ``bench_train_step.py``),
alternating the cases over ``--rounds`` rounds; peak memory is the RSS (or CUDA memory) above what the process held
once the backbone and batch were in place. "last half, cached" steps on the tokens after the frozen half (what
training does with ``--blocks`` and no augmentation), so the frozen blocks are not in the step at all.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_train_step import peak_memory, time_train_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import base_parser, machine_line, parse, print_table, ratio

CASES = {"every block": None, "last half": "half", "last half, cached": "half-cached"}


def probe(epochs: int) -> None:
    from adaptkit.models import PACKAGED_BACKBONE
    from adaptkit.registry import Registry
    from adaptkit.training import TrainConfig, train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp) / "r.db")
        for cached in (True, False):
            t0 = time.perf_counter()
            result = train("digits", task=f"probe-{cached}", backbone=PACKAGED_BACKBONE, method="linear",
                           config=TrainConfig(epochs=epochs, augment=False, feature_cache=cached), registry=registry)
            rows.append(["cached features" if cached else "images every epoch", f"{time.perf_counter() - t0:.1f}",
                         f"{result.version.train_time_s:.1f}", f"{100 * result.metrics['test_top1']:.1f}%"])
    speedup = float(rows[1][1]) / float(rows[0][1])
    print(f"# linear probe on digits, {PACKAGED_BACKBONE}, {epochs} epochs, no augmentation; {machine_line()}")
    print_table(["how", "train() s", "of which training s", "test top-1"], rows)
    print(f"\nend to end: {speedup:.1f}x faster with the cache")


def one_case(case: str, backbone_name: str, batch: int, steps: int, device: str) -> dict:
    """In the child: ``steps`` adapter training steps after a warm-up step, and the peak memory."""
    from adaptkit.backbone import create_backbone
    from adaptkit.methods import get_method
    from adaptkit.training.feature_cache import CachedTask, run_prefix

    backbone = create_backbone(backbone_name, pretrained=False, device=device)
    depth = len(backbone.model.blocks)
    size = backbone.data_config["input_size"][-1]
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    cuda = device.startswith("cuda")
    blocks = None if CASES[case] is None else depth // 2
    task = get_method("adapter", {"rank": 64, "blocks": blocks}).attach(backbone.model, 10)
    net, inputs = task, x
    if CASES[case] == "half-cached":
        with torch.no_grad():
            task.ctx.active = task.slot
            inputs = run_prefix(task.trunk, x, depth - blocks)
        net = CachedTask(task, depth - blocks)
    times, peak = peak_memory(lambda: time_train_steps(net, task.trainable_parameters(), inputs, y, steps, cuda), cuda)
    return {"time": statistics.median(times), "peak_mb": peak / 2**20, "trainable": task.num_trainable()}


def blocks(args) -> None:
    threads = ["--threads", str(args.threads)] if args.threads else []
    steps = args.repeats or 3
    results: dict[str, list[dict]] = {c: [] for c in CASES}
    for _ in range(args.rounds):
        for case in CASES:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, *threads, "child", case,
                   args.backbone, str(args.batch), str(steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[case].append(json.loads(out.strip().splitlines()[-1]))
    base = results["every block"]
    t0, m0 = statistics.median(r["time"] for r in base), statistics.median(r["peak_mb"] for r in base)
    rows = []
    for case, runs in results.items():
        t, m = statistics.median(r["time"] for r in runs), statistics.median(r["peak_mb"] for r in runs)
        rows.append([case, f"{runs[0]['trainable'] / 1e6:.3f}", f"{t * 1e3:.0f}", ratio(t, t0), f"{m:.0f}",
                     ratio(m, m0)])
    print(f"# adapter r=64 (parallel), {args.backbone}, batch {args.batch}: median step of {steps} steps after a "
          f"warm-up, median over {args.rounds} alternating rounds; {machine_line()}")
    print_table(["adapters in", "trainable M", "step ms", "vs every block", "peak MB", "vs every block"], rows)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("what", choices=["probe", "blocks", "child"])
    parser.add_argument("child_args", nargs="*", help=argparse_hidden())
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parse(parser)
    if args.what == "child":
        case, name, batch, steps = args.child_args
        print(json.dumps(one_case(case, name, int(batch), int(steps), args.device)))
    elif args.what == "probe":
        probe(args.epochs)
    else:
        blocks(args)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()

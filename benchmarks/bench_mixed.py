"""A mixed batch of K tasks (adapter r=64) against a single-task batch of the same size and against K separate calls
(one per task, each with its share of the batch), all through ``Predictor``."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import base_parser, machine_line, parse, print_table, ratio, register_tasks, sync

from adaptkit.predict import Predictor
from adaptkit.registry import Registry


def round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, timed one call of each per round after one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for round_ in range(repeats + 1):
        for label, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_:
                times[label].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def cases(predictor: Predictor, refs: list[str], x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The three ways to serve batch ``x`` whose sample b belongs to ``refs[b]``."""
    mixed_refs = [refs[b % len(refs)] for b in range(x.shape[0])]
    shares = {r: [b for b in range(x.shape[0]) if mixed_refs[b] == r] for r in refs}
    return {
        "single-task batch": lambda: predictor.logits(x, refs[0]),
        f"mixed batch, {len(refs)} tasks": lambda: predictor.logits_mixed(x, mixed_refs),
        f"{len(refs)} separate calls": lambda: [predictor.logits(x[idx], r) for r, idx in shares.items()],
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    args = parse(parser)
    specs = [("vit_tiny_patch16_224", 16)]
    if not args.quick:
        specs = [("vit_tiny_patch16_224", 32), ("vit_base_patch16_224", 32)]
    repeats = args.repeats or (3 if args.quick else 5)
    rows = []
    for name, batch in specs:
        with tempfile.TemporaryDirectory() as tmp:
            reg = Registry(Path(tmp) / "reg.db")
            refs = [f"t{i}" for i in range(args.tasks)]
            register_tasks(reg, name, [(r, "adapter", {"rank": 64}, 10) for r in refs])
            predictor = Predictor(reg, device=args.device)
            x = torch.randn(batch, 3, 224, 224, device=args.device)
            times = round_robin(cases(predictor, refs, x), repeats)
        single = times["single-task batch"]
        rows += [[name, batch, label, f"{t * 1e3:.0f}", ratio(t, single)] for label, t in times.items()]
    print(f"# mixed batches, adapter r64, median of {repeats} rounds; {machine_line()}")
    print_table(["backbone", "batch", "how", "ms", "vs single-task"], rows)


if __name__ == "__main__":
    main()

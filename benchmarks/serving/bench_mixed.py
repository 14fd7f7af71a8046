"""A mixed batch of K tasks (adapter r=64) against a single-task batch of the same size and against K separate calls
(one per task, each with its share of the batch), all through ``Predictor``.

``--mix methods``: the K=8 tasks are one of each kind instead (adapter, Adapter+, LoRA, SSF, BitFit, VPT-deep with
10 prompts, VPT-shallow with 5, linear); the single-task batch is the adapter task's."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import base_parser, machine_line, parse, print_table, ratio, register_tasks, round_robin

from adaptkit.inference import Predictor
from adaptkit.registry import Registry

# one task of each kind that shares the backbone (full fine-tuning runs its own copy, so it is no part of the pass)
EVERY_KIND = [("adapter", {"rank": 64}), ("adapter", {"placement": "adapterplus"}), ("lora", {"rank": 8}),
              ("ssf", {}), ("bitfit", {}), ("vpt", {"tokens": 10}), ("vpt", {"tokens": 5, "mode": "shallow"}),
              ("linear", {})]


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
    parser.add_argument("--mix", choices=["adapter", "methods"], default="adapter",
                        help="K adapter tasks, or one task of each kind of method (K=8)")
    args = parse(parser)
    specs = [("vit_tiny_patch16_224", 16)]
    if not args.quick:
        specs = [("vit_tiny_patch16_224", 32), ("vit_base_patch16_224", 32)]
    repeats = args.repeats or (3 if args.quick else 5)
    rows = []
    for name, batch in specs:
        with tempfile.TemporaryDirectory() as tmp:
            reg = Registry(Path(tmp) / "reg.db")
            if args.mix == "methods":
                refs = [f"{m}{i}" for i, (m, _) in enumerate(EVERY_KIND)]
                register_tasks(reg, name, [(r, m, c, 10) for r, (m, c) in zip(refs, EVERY_KIND, strict=True)])
            else:
                refs = [f"t{i}" for i in range(args.tasks)]
                register_tasks(reg, name, [(r, "adapter", {"rank": 64}, 10) for r in refs])
            predictor = Predictor(reg, device=args.device)
            x = torch.randn(batch, 3, 224, 224, device=args.device)
            times = round_robin(cases(predictor, refs, x), repeats)
        single = times["single-task batch"]
        rows += [[name, batch, label, f"{t * 1e3:.0f}", ratio(t, single)] for label, t in times.items()]
    what = "one task of each method" if args.mix == "methods" else "adapter r64"
    print(f"# mixed batches, {what}, median of {repeats} rounds; {machine_line()}")
    print_table(["backbone", "batch", "how", "ms", "vs single-task"], rows)


if __name__ == "__main__":
    main()

"""Inference time of each method against the bare backbone (the overhead ratio), single-task batches.

Every method's task is attached to one backbone; the bare backbone is a clean copy without any sites. Configurations
are timed round-robin (one call of each per round), so a slow spell of a shared machine hits them all alike.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import METHOD_SPECS, base_parser, machine_line, method_runs, parse, print_table, ratio, sync

from adaptkit.backbone import create_backbone


def run(backbone_name: str, batch: int, repeats: int, device: str, only: list[str] | None) -> list[list[str]]:
    backbone = create_backbone(backbone_name, pretrained=False, device=device)
    bare = copy.deepcopy(backbone.model)
    configs = {"bare backbone": bare}
    for label, (method, config) in METHOD_SPECS.items():
        if only and label not in only:
            continue
        configs.update(method_runs(backbone.model, label, method, config))
    x = torch.randn(batch, 3, 224, 224, device=device)
    times: dict[str, list[float]] = {k: [] for k in configs}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    with torch.inference_mode(), autocast:
        for round_ in range(repeats + 1):  # round 0 is the warm-up
            for label, model in configs.items():
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                if round_:
                    times[label].append(time.perf_counter() - start)
    base = statistics.median(times["bare backbone"])
    return [[backbone_name, batch, label, f"{statistics.median(t) * 1e3:.1f}", ratio(statistics.median(t), base)]
            for label, t in times.items()]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backbone", help="one backbone instead of the default list")
    parser.add_argument("--batch", type=int, help="one batch size instead of the default list")
    parser.add_argument("--only", nargs="+", metavar="METHOD", help=f"some of: {', '.join(METHOD_SPECS)}")
    args = parse(parser)
    if args.quick:
        cases = [("vit_tiny_patch16_224", 1), ("vit_tiny_patch16_224", 8)]
    else:
        cases = [("vit_tiny_patch16_224", 1), ("vit_tiny_patch16_224", 32),
                 ("vit_base_patch16_224", 1), ("vit_base_patch16_224", 32)]
    repeats = args.repeats or (3 if args.quick else 7)
    if args.backbone or args.batch:
        cases = [(args.backbone or n, args.batch or b) for n, b in cases]
        cases = list(dict.fromkeys(cases))
    print(f"# inference, median of {repeats} rounds; {machine_line()}", flush=True)
    for name, batch in cases:  # one table per case, printed as soon as it is measured
        print_table(["backbone", "batch", "method", "ms", "vs bare"], run(name, batch, repeats, args.device, args.only))
        print(flush=True)


if __name__ == "__main__":
    main()

"""Inference overhead of each method over the bare backbone, for each ViT family at its default input size.

One random-weight model per family (timm's architecture, ``pretrained=False``), batch 32 at the input size of the
family's pretrained config; every method (``METHOD_SPECS``, LoRA and SSF also merged) is attached to its own copy of
the bare model, so a method that fails on a family leaves the others' figures alone, and its row says why. All
configurations of a family are timed round-robin (one call of each per round), so a slow spell of a shared machine
hits them all alike, and each figure is the best of its rounds (another process only ever adds time).
``--sizes 224 518`` times instead the bare backbone of each family at those input sizes (timm's ``img_size``, as
``--image-size`` builds it) against its default size. ``--quick`` runs narrow, shallow versions of each family
(timm's own kwargs: depth 2, width 96) at batch 8, still at the family's input size: what a 2-core CPU can run in a
few minutes. ``--threads 1`` (or ``OMP_NUM_THREADS=1``) avoids OpenMP stalls on a busy CPU; with it, ``--clock cpu``
times the CPU time of the one thread that computes, which other processes on the machine do not add to (wall time
does, when they outnumber the cores).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import METHOD_SPECS, base_parser, machine_line, method_runs, parse, print_table, ratio, sync

from adaptkit.backbone_info import default_input_size, describe_arch

# family -> the timm architecture whose default input size and layout the row uses (ViT-B-sized, random weights)
FAMILIES: dict[str, str] = {
    "ViT": "vit_base_patch16_224",
    "DeiT distilled": "deit_base_distilled_patch16_224",
    "DINOv2": "vit_base_patch14_dinov2",
    "DINOv2 + registers": "vit_base_patch14_reg4_dinov2",
    "DINOv3": "vit_base_patch16_dinov3",
    "SigLIP": "vit_base_patch16_siglip_224",
    "CLIP": "vit_base_patch16_clip_224",
    "EVA02": "eva02_base_patch14_224",
    "PE core": "vit_pe_core_base_patch16_224",
    "ViT RoPE": "vit_base_patch16_rope_224",
    "BEiT": "beit_base_patch16_224",
}
QUICK_KWARGS = {"depth": 2, "embed_dim": 96, "num_heads": 2}


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def best_of(calls: dict[Any, Any], repeats: int, clock: Any = time.perf_counter) -> dict[Any, float]:
    """Seconds of each callable, the best of ``repeats`` round-robin rounds after one warm-up round."""
    best = {k: float("inf") for k in calls}
    for round_ in range(repeats + 1):
        for key, fn in calls.items():
            sync()
            start = clock()
            fn()
            sync()
            if round_:
                best[key] = min(best[key], clock() - start)
    return best


def build(arch: str, quick: bool, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=0, **(QUICK_KWARGS if quick else {}),
                             **kwargs).eval()


def run_sizes(family: str, arch: str, sizes: list[int], batch: int, repeats: int, device: str,
              quick: bool, clock: Any) -> list[list[str]]:
    """The bare backbone at its default input size and at each of ``sizes``, round-robin."""
    own, patch = default_input_size(arch), describe_arch(arch).patch
    calls = {}
    for size in dict.fromkeys([own, *(s for s in sizes if s % patch == 0)]):  # a size must be whole patches
        model = build(arch, quick, img_size=size).to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        calls[size] = lambda m=model, x=x: m(x)
    with torch.inference_mode():
        times = best_of(calls, repeats, clock)
    return [[family, size, f"{t * 1e3:.1f}", ratio(t, times[own])] for size, t in times.items()]


def configs(bare: torch.nn.Module, only: list[str] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The callables to time (bare first) and, per method that could not be attached, why."""
    runs: dict[str, Any] = {"bare backbone": bare}
    failed: dict[str, str] = {}
    for label, (method, config) in METHOD_SPECS.items():
        if only and label not in only:
            continue
        try:
            runs.update(method_runs(copy.deepcopy(bare), label, method, config))
        except Exception as exc:  # noqa: BLE001  (the row reports the failure; the benchmark goes on)
            failed[label] = f"fails: {type(exc).__name__}"
    return runs, failed


def run_family(family: str, arch: str, batch: int, repeats: int, device: str, quick: bool,
               only: list[str] | None, clock: Any) -> list[list[str]]:
    size = default_input_size(arch)
    bare = build(arch, quick).to(device)
    runs, failed = configs(bare, only)
    x = torch.randn(batch, 3, size, size, device=device)
    calls: dict[str, Any] = {}
    for label, model in runs.items():
        try:
            with torch.inference_mode():
                model(x[:1])  # a forward that fails is reported, not timed
            calls[label] = lambda m=model: m(x)
        except Exception as exc:  # noqa: BLE001
            failed[label] = f"forward fails: {type(exc).__name__}"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    with torch.inference_mode(), autocast:
        times = best_of(calls, repeats, clock)
    base = times["bare backbone"]
    rows = [[family, size, label, f"{t * 1e3:.1f}", ratio(t, base)] for label, t in times.items()]
    return rows + [[family, size, label, "-", why] for label, why in failed.items()]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", metavar="NAME", help=f"some of: {', '.join(FAMILIES)}")
    parser.add_argument("--batch", type=int, help="batch size [default: 32; --quick: 8]")
    parser.add_argument("--only", nargs="+", metavar="METHOD", help=f"some of: {', '.join(METHOD_SPECS)}")
    parser.add_argument("--sizes", nargs="+", type=int, metavar="PX", help="time the bare backbone at these input "
                        "sizes against its own instead of the methods")
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="wall time, or the CPU time of this thread "
                        "(with --threads 1 on a CPU shared with other processes)")
    args = parse(parser)
    if args.clock == "cpu" and (args.device != "cpu" or torch.get_num_threads() != 1):
        parser.error("--clock cpu needs --device cpu and --threads 1: other threads' work would not be counted")
    clock = CLOCKS[args.clock]
    batch = args.batch or (8 if args.quick else 32)
    repeats = args.repeats or 5
    shape = "depth 2, width 96 (--quick)" if args.quick else "timm's default (ViT-B-sized)"
    print(f"# inference per family, {shape}, batch {batch}, best of {repeats} round-robin rounds, {args.clock} time; "
          f"{machine_line()}; timm {timm.__version__}", flush=True)
    for family in args.family or FAMILIES:
        if args.sizes:
            print_table(["family", "px", "ms", "vs own size"],
                        run_sizes(family, FAMILIES[family], args.sizes, batch, repeats, args.device, args.quick,
                                  clock))
            print(flush=True)
            continue
        print_table(["family", "px", "method", "ms", "vs bare"],
                    run_family(family, FAMILIES[family], batch, repeats, args.device, args.quick, args.only,
                               clock))
        print(flush=True)


if __name__ == "__main__":
    main()

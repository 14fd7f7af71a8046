"""HF PEFT's LoRA against adaptkit on the same timm ViT: switching between resident adapters and a mixed batch.

PEFT: ``get_peft_model`` with ``LoraConfig(target_modules=["qkv"])`` on the timm model, K adapters added with
``add_adapter``, ``set_adapter`` to switch, and ``model(x, adapter_names=[...])`` for a mixed batch (PEFT's
mixed-batch inference: each LoRA layer loops over the distinct adapters in the batch). PEFT's timm model has no
per-task heads, so its figures cover the trunk only; adaptkit's include each task's head.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import base_parser, machine_line, parse, print_table, ratio, register_tasks, round_robin
from peft import LoraConfig, get_peft_model

from adaptkit.backbone import create_backbone
from adaptkit.inference import Predictor
from adaptkit.registry import Registry


def peft_model(backbone_model: torch.nn.Module, count: int, rank: int) -> torch.nn.Module:
    """A PEFT LoRA model with ``count`` adapters ``t0..`` of random (non-zero) weights."""
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["qkv"])
    model = get_peft_model(copy.deepcopy(backbone_model), config, adapter_name="t0")
    for i in range(1, count):
        model.add_adapter(f"t{i}", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def switch_us(fn, refs: list[str], switches: int) -> float:
    for i in range(100):
        fn(refs[i % len(refs)])
    times = []
    for i in range(switches):
        start = time.perf_counter_ns()
        fn(refs[i % len(refs)])
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    args = parse(parser)
    name, batch = ("vit_tiny_patch16_224", 16) if args.quick else ("vit_base_patch16_224", 32)
    repeats = args.repeats or (3 if args.quick else 5)
    refs = [f"t{i}" for i in range(args.tasks)]
    mixed = [refs[b % len(refs)] for b in range(batch)]
    x = torch.randn(batch, 3, 224, 224)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        backbone = create_backbone(name, pretrained=False)
        peft = peft_model(backbone.model, args.tasks, 8)
        lora_reg, adapter_reg = Registry(Path(tmp) / "lora.db"), Registry(Path(tmp) / "adapter.db")
        register_tasks(lora_reg, name, [(r, "lora", {"rank": 8, "alpha": 16.0}, 10) for r in refs])
        register_tasks(adapter_reg, name, [(r, "adapter", {"rank": 64}, 10) for r in refs])
        ours = {"adaptkit lora r8": Predictor(lora_reg, device="cpu"),
                "adaptkit adapter r64": Predictor(adapter_reg, device="cpu")}
        for p in ours.values():
            for r in refs:
                p.load(r)

        switches = 2000 if args.quick else 20000
        peft_switch = switch_us(peft.set_adapter, refs, switches)
        rows.append(["switch (resident)", "peft lora r8 set_adapter", f"{peft_switch:.1f} us", ""])
        for label, p in ours.items():
            ours_switch = switch_us(p.activate, refs, switches)
            rows.append(["switch (resident)", f"{label} activate", f"{ours_switch:.2f} us", ""])

        peft.set_adapter("t0")
        fns = {"peft lora r8, one adapter": lambda: peft(x),
               f"peft lora r8, mixed {args.tasks}": lambda: peft(x, adapter_names=mixed)}
        for label, p in ours.items():
            fns[f"{label}, one task"] = lambda p=p: p.logits(x, "t0")
            fns[f"{label}, mixed {args.tasks}"] = lambda p=p: p.logits_mixed(x, mixed)
        times = round_robin(fns, repeats)
    peft_mixed = times[f"peft lora r8, mixed {args.tasks}"]
    for label, t in times.items():
        rows.append([f"batch {batch}", label, f"{t * 1e3:.0f} ms", ratio(t, peft_mixed)])
    print(f"# {name}, PEFT vs adaptkit, median of {repeats} rounds; {machine_line()}")
    print_table(["what", "how", "time", "vs peft mixed"], rows)


if __name__ == "__main__":
    main()

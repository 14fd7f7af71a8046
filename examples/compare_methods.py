"""What adapters buy: adapter, LoRA, linear probe and full fine-tuning trained with the same budget, side by side.

    python examples/compare_methods.py --no-augment          # offline: the packaged backbone on the digits
    python examples/compare_methods.py --dataset cifar100 --backbone vit_base_patch16_224.augreg_in21k --epochs 10

Prints a Markdown table of test accuracy, trainable parameters and bytes on disk (the README's table comes from here).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from adaptkit.compare import format_bytes, format_percent
from adaptkit.models import PACKAGED_BACKBONE
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, train

RUNS = [  # (label, method, settings, backbone weights)
    ("adapter r=32 (parallel)", "adapter", {"rank": 32}, True),
    ("lora r=8 (qkv)", "lora", {"rank": 8}, True),
    ("linear probe", "linear", {}, True),
    ("full fine-tuning", "full", {}, True),
    ("adapter r=32, random backbone", "adapter", {"rank": 32}, False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--backbone", default=PACKAGED_BACKBONE)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-augment", action="store_true", help="no random crops (the default is light ones)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp) / "registry.db")
        for label, method, settings, pretrained in RUNS:
            config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                                 augment=not args.no_augment)
            result = train(args.dataset, task=f"t{len(rows)}", backbone=args.backbone, pretrained=pretrained,
                           method=method, method_config=settings, config=config, registry=registry)
            v = result.version
            rows.append((label, format_percent(result.metrics["test_top1"]), f"{v.trainable_params:,}",
                         format_bytes(v.bytes), f"{v.train_time_s:.0f} s"))
            print(f"{label}: {rows[-1][1]}", flush=True)
    augment = "no augmentation" if args.no_augment else "light augmentation (random crops of 60-100%)"
    print(f"\n{args.dataset} on {args.backbone}, {args.epochs} epochs, batch {args.batch_size}, {augment}, "
          f"seed {args.seed}; each method at its default learning rate\n")
    print("| method | test top-1 | trainable parameters | file | train time |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

"""Add three tasks one after another on one frozen backbone, and show the first task's predictions do not move.

    python examples/continual_tasks.py                         # offline: scikit-learn's digits, a small ViT
    python examples/continual_tasks.py --backbone vit_base_patch16_224.augreg_in21k --pretrained

Task 1 reads the digits (10 classes); tasks 2 and 3 are new label sets over the same images (even/odd, and
small/large), written as ``folder:`` data sets, the format for your own images.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image
from sklearn.datasets import load_digits

from adaptkit.inference import Predictor
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, train


def write_folder(root: Path, label_of: dict[int, str]) -> str:
    """Write the digits as PNGs into ``root/<label>/``; returns the ``folder:`` spec."""
    digits = load_digits()
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / label_of[int(target)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255 / 16).astype("uint8"), mode="L").save(folder / f"{i:04d}.png")
    return f"folder:{root}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_pico_patch4_32")
    parser.add_argument("--pretrained", action="store_true", help="the backbone's pretrained weights (else random)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit-train", type=int, default=None, help="train on at most this many images a task")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        registry = Registry(tmp / "registry.db")
        config = TrainConfig(epochs=args.epochs, batch_size=32, lr=3e-3, augment=False, limit_train=args.limit_train,
                             limit_eval=args.limit_train)
        common = {"backbone": args.backbone, "pretrained": args.pretrained, "registry": registry, "config": config}
        tasks = [
            ("digits", "digits", "adapter"),
            ("parity", write_folder(tmp / "parity", {d: "even" if d % 2 == 0 else "odd" for d in range(10)}), "lora"),
            ("size", write_folder(tmp / "size", {d: "small" if d < 5 else "large" for d in range(10)}), "adapter"),
        ]
        probe = [Image.fromarray((p * 255 / 16).astype("uint8"), mode="L") for p in load_digits().images[:8]]
        first = None
        for n, (task, spec, method) in enumerate(tasks, start=1):
            result = train(spec, task=task, method=method, **common)
            print(f"task {n}: {task} ({method}) test top-1 {100 * result.metrics['test_top1']:.1f}%")
            predictor = Predictor(registry, device="cpu")  # a fresh one: the digits adapter is read from its file
            logits = predictor.logits(predictor.preprocess(probe, predictor.load("digits")), "digits")
            first = logits if first is None else first
            same = torch.equal(logits, first)
            print(f"  digits logits after adding task {n}: {'unchanged' if same else 'CHANGED'}")
            assert same, "adding a task changed another task's predictions"
        print("the first task's predictions are bit-for-bit the same after the third task was added")


if __name__ == "__main__":
    main()

"""Does a warm start help? A data set split into two tasks by class; the second task cold against warm.

    python benchmarks/accuracy/warm_start.py                      # digits 0-4 -> 5-9 and glyphs A-E -> F-J
    python benchmarks/accuracy/warm_start.py --epochs-b 3 10      # the second task's budgets

Task A (the first half of the classes) trains an adapter; task B (the other half: new classes, so a new head) then
trains with the same budget twice: from the identity (cold) and from A's adapter (``init_from``). Both on the
packaged backbone, no augmentation, seed 0, the adapter's default learning rate. At the end ``--init-from auto``
is asked which registered task each B is closest to (cosine of mean frozen features), to show it picks its own A.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from adaptkit.models import PACKAGED_BACKBONE

ROOT = Path.home() / ".cache" / "adaptkit" / "bench" / "splits"
SETTINGS = {"rank": 32}


def split_digits(root: Path) -> tuple[str, str]:
    """digits as two image folders: classes 0-4 and 5-9, each with adaptkit's own train/test split."""
    from adaptkit.data import load_task_data

    out = [root / "digits-0-4", root / "digits-5-9"]
    if not (out[1] / "done").is_file():
        data = load_task_data("digits", {"input_size": (3, 32, 32)}, val_fraction=0.0)
        for split, view in (("train", data.train), ("test", data.test)):
            for i in view.indices:
                img, y = view.source[i]
                folder = out[y // 5] / split / data.classes[y]
                folder.mkdir(parents=True, exist_ok=True)
                img.save(folder / f"{i:05d}.png")
        for o in out:
            (o / "done").write_text("ok\n")
    return f"folder:{out[0]}", f"folder:{out[1]}"


def split_glyphs(root: Path, glyphs: Path) -> tuple[str, str]:
    """glyphs as two folders of links: letters A-E and F-J."""
    out = [root / f"{glyphs.name}-A-E", root / f"{glyphs.name}-F-J"]  # named after the source: a new one, new links
    for part in ("train", "test"):
        for letter_dir in sorted((glyphs / part).iterdir()):
            dest = out["ABCDE".find(letter_dir.name) < 0] / part / letter_dir.name
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.symlink_to(letter_dir, target_is_directory=True)
    return f"folder:{out[0]}", f"folder:{out[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs-a", type=int, default=10)
    parser.add_argument("--epochs-b", type=int, nargs="+", default=[3])
    parser.add_argument("--datasets", nargs="*", default=["digits", "glyphs"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
    from common.data import make_glyphs  # benchmarks/common/data.py

    from adaptkit.backbone import create_backbone
    from adaptkit.data import load_task_data
    from adaptkit.methods import get_method
    from adaptkit.registry import Registry
    from adaptkit.training import TrainConfig, train, warmstart

    pairs = {"digits": split_digits(ROOT), "glyphs": split_glyphs(ROOT, make_glyphs())}
    pairs = {k: v for k, v in pairs.items() if k in args.datasets}
    backbone = create_backbone(PACKAGED_BACKBONE)
    rows = []
    budget = {"batch_size": 64, "augment": False, "seed": 0}
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp) / "r.db")
        for name, (spec_a, _) in pairs.items():
            a = train(spec_a, task=f"{name}-a", backbone=backbone, method_config=SETTINGS, registry=registry,
                      config=TrainConfig(epochs=args.epochs_a, **budget))
            print(f"{name} A: {100 * a.metrics['test_top1']:.1f}%", flush=True)
        for name, (_, spec_b) in pairs.items():  # with only the A tasks registered: which one would auto pick?
            data = load_task_data(spec_b, backbone.data_config, augment=False)
            pick = warmstart.choose("auto", registry=registry, backbone=backbone,
                                    method=get_method("adapter", SETTINGS), data=data)
            scores = ", ".join(f"{k} {v:.3f}" for k, v in pick.scores.items())
            print(f"auto for {name} B: {pick.ref} (cosine: {scores})", flush=True)
        for name, (_, spec_b) in pairs.items():
            for epochs in args.epochs_b:
                top1 = {}
                for how, init in (("cold", None), ("warm", f"{name}-a")):
                    b = train(spec_b, task=f"{name}-b-{how}-{epochs}", backbone=backbone, method_config=SETTINGS,
                              registry=registry, config=TrainConfig(epochs=epochs, **budget), init_from=init)
                    top1[how] = 100 * b.metrics["test_top1"]
                    print(f"{name} B {how}, {epochs} epochs: {top1[how]:.1f}%", flush=True)
                rows.append((name, epochs, top1["cold"], top1["warm"]))
    print(f"\n{PACKAGED_BACKBONE}, adapter r=32, task A {args.epochs_a} epochs; no augmentation, batch 64, seed 0\n")
    print("| data set (A -> B) | B epochs | B cold | B warm from A | warm - cold |")
    print("| --- | --- | --- | --- | --- |")
    for name, epochs, cold, warm in rows:
        print(f"| {name} | {epochs} | {cold:.1f}% | {warm:.1f}% | {warm - cold:+.1f} |")


if __name__ == "__main__":
    main()

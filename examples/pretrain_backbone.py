"""Pretrain adaptkit's small packaged backbone from scratch on CIFAR-10, with adaptkit's own loop (method ``full``).

    python examples/pretrain_backbone.py                      # reads ../shared/data/cifar10.tar.gz or downloads
    python examples/pretrain_backbone.py --archive PATH.tar.gz --epochs 16

The archive is unpacked into a cache folder (never into the repository). The trained trunk is written in fp16 to
``adaptkit/weights/vit_cifar_tiny_patch4_32.adaptkit_c10.safetensors`` (the file timm loads for
``vit_cifar_tiny_patch4_32.adaptkit_c10``), with the recipe and the accuracy in its metadata and in
``adaptkit/weights/README.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from adaptkit.models import _PACKAGED_FILE, PACKAGED_BACKBONE
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, TrainEvent, train

ARCH = PACKAGED_BACKBONE.split(".")[0]
DEFAULT_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10.tar.gz"
CACHE = Path.home() / ".cache" / "adaptkit" / "cifar10"
RECIPE = TrainConfig(epochs=16, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_epochs=2, label_smoothing=0.1,
                     grad_clip=1.0, seed=0, precision="bf16", crop_scale=(0.6, 1.0), val_fraction=0.05)


def dataset_spec(archive: Path) -> str:
    """``folder:<cache>`` with the archive unpacked there, or ``cifar10`` (torchvision's download) with no archive."""
    if (CACHE / "train").is_dir() and (CACHE / "test").is_dir():
        return f"folder:{CACHE}"
    if archive.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xzf", str(archive), "-C", str(CACHE)], check=True)
        return f"folder:{CACHE}"
    return "cifar10"


def log(event: TrainEvent, state: dict = {}) -> None:  # noqa: B006 - a small throttle shared across calls
    now = time.time()
    if event.phase == "train" and now - state.get("last", 0) < 60 and event.step != event.steps:
        return
    state["last"] = now
    extra = f" loss {event.loss:.3f} acc {event.accuracy:.3f}" if event.loss is not None else ""
    rate = f" {event.images_per_s:.0f} img/s" if event.images_per_s else ""
    print(f"[{time.strftime('%H:%M:%S')}] {event.phase} epoch {event.epoch}/{event.epochs} "
          f"step {event.step}/{event.steps}{extra}{rate}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--epochs", type=int, default=RECIPE.epochs)
    parser.add_argument("--out", type=Path, default=_PACKAGED_FILE)
    parser.add_argument("--limit-train", type=int, default=None, help="a smoke run on this many images")
    args = parser.parse_args()
    recipe = TrainConfig(**{**asdict(RECIPE), "epochs": args.epochs, "limit_train": args.limit_train,
                            "limit_eval": args.limit_train})
    spec = dataset_spec(args.archive)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(spec, task="cifar10", backbone=ARCH, pretrained=False, method="full", config=recipe,
                       registry=Registry(Path(tmp) / "pretrain.db"), on_event=log)
    trunk = result.model.parts["backbone"]
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in trunk.state_dict().items()}
    metrics = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items()}
    info = {"recipe": {k: v for k, v in asdict(recipe).items() if v is not None}, "metrics": metrics,
            "history": result.history, "train_time_s": round(result.version.train_time_s, 1),
            "device": result.version.device, "dataset": "CIFAR-10 (50,000 train incl. a 5 % validation split, "
                                                       "10,000 test)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(args.out), metadata={"architecture": ARCH, "info": json.dumps(info)})
    (args.out.parent / "pretrain_log.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()

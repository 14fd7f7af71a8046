"""``torchrun --nproc_per_node 1 -m adaptkit.cli train`` through the real training entry point: one short epoch of
the packaged backbone with an adapter on CIFAR-10 JPEGs, data-parallel through DDP (NCCL on a GPU, gloo on the CPU),
then the registry row it wrote, checked.

The JPEGs come from the archive given with ``--cifar`` (by default ``benchmarks/gpu/cache/cifar10.tar.gz``, carried
to a GPU machine with the working tree, else ``../shared/data/cifar10.tar.gz``), unpacked into the run's folder;
where there is none (a GPU machine gets no ``../shared``), synthetic JPEGs of ten classes of colours are made.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from common.data import CIFAR10, SHARED, _from_archive
from PIL import Image

from adaptkit.models import PACKAGED_BACKBONE
from adaptkit.registry import Registry

if TYPE_CHECKING:
    from run import Context

CACHED = Path(__file__).resolve().parent / "cache" / "cifar10.tar.gz"


def synthetic_jpegs(out: Path, train: int, test: int) -> Path:
    """Ten classes of 32x32 JPEGs, each class a colour of its own with noise: learnable in one short epoch."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CIFAR10):
        colour = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 181 + 40) % 256])
        for split, count in (("train", train), ("test", test)):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return out


def cifar_folder(ctx: Context, train: int, test: int) -> tuple[Path, str]:
    """The images as a ``folder:`` tree, and where they came from (``--cifar`` given: that archive or none)."""
    candidates = [ctx.cifar] if ctx.cifar is not None else [CACHED, SHARED / "cifar10.tar.gz"]
    archive = next((p for p in candidates if p.is_file()), None)
    if archive is None:
        return (synthetic_jpegs(ctx.work / "synthetic", train, test),
                f"synthetic JPEGs (no CIFAR-10 archive at {', '.join(map(str, candidates))})")
    return _from_archive(ctx.work / "cifar10", CIFAR10, train, test, archive=archive), f"CIFAR-10 JPEGs from {archive}"


def run(ctx: Context) -> None:
    train, test, batch = (64, 32, 16) if ctx.tiny else (5000, 1000, 256)
    data, source = cifar_folder(ctx, train // 10, test // 10)
    db = ctx.work / "ddp" / "registry.db"
    db.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
           "adaptkit.cli", "train", "--dataset", f"folder:{data}", "--task", "cifar10-ddp", "--backbone",
           PACKAGED_BACKBONE, "--epochs", "1", "--batch-size", str(batch), "--device", ctx.device, "--registry",
           str(db), *(["--num-workers", "0"] if ctx.tiny else [])]
    tick = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - tick
    ok = proc.returncode == 0
    ctx.sink.check("torchrun train exits 0", f"{train} images, batch {batch}", "exit status 0",
                   str(proc.returncode), ok)
    if not ok:  # the trainer's own message first: torchrun's summary after it says little
        errors = [line for line in proc.stderr.splitlines() if line.lower().startswith(("error", "traceback"))]
        raise SystemExit("\n".join(errors[-5:]) + "\n" + proc.stderr[-2000:])
    versions = [v for t in Registry(db).tasks() for v in t.versions]
    ctx.sink.check("version registered", "cifar10-ddp", "one row", str(len(versions)), len(versions) == 1)
    row = versions[0]
    backend = "nccl" if ctx.cuda else "gloo"
    ctx.sink.check("trained through DDP", "the row's ddp_backend", backend, str(row.train.get("ddp_backend")),
                   row.train.get("ddp_backend") == backend)
    info, m = row.train, row.metrics
    ctx.sink.table("torchrun --nproc_per_node 1 -m adaptkit.cli train", ["what", "value"], [
        ["data", f"{source}: {info.get('train_images')} training images, {m.get('test_images')} test"],
        ["registered", f"{row.ref}, {row.method}, {row.bytes:,} bytes, sha256 {row.sha256[:12]}"],
        ["device", f"{row.device}, DDP backend {info.get('ddp_backend')}, world size {info.get('world_size')}"],
        ["training", f"{info.get('images_per_s', 0):,.0f} images/s, peak {row.peak_memory_mb or 0:,.0f} MiB, "
                     f"{row.train_time_s or 0:.1f} s"],
        ["test top-1 after one epoch", f"{m.get('test_top1', 0):.1%}"],
        ["whole command", f"{seconds:.0f} s"]])

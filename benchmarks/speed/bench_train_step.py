"""One training step (forward, backward, AdamW step) and peak memory of each method against full fine-tuning.

Each method runs in a fresh subprocess, so that one method's memory never counts against another. Peak memory is
measured above the process's memory once the backbone and the batch are in place: on CUDA with
``torch.cuda.max_memory_allocated``, on the CPU by sampling the resident set size (RSS) every millisecond. It covers
what the method itself needs: a full fine-tuning copy of the backbone, gradients, AdamW state and activations.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import METHOD_SPECS, base_parser, machine_line, parse, print_table, ratio, sync

SPECS = {**METHOD_SPECS, "full": ("full", {})}
CHECKPOINTED = ", checkpointed"  # a label's suffix: the method with activation checkpointing (``--checkpointing``)


class PeakRSS:
    """Sample this process's RSS in a thread; ``peak`` is the highest value seen while running."""

    def __init__(self, interval: float = 0.001) -> None:
        self.proc, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()

    def __enter__(self) -> PeakRSS:
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def train_step(net: torch.nn.Module, params: Any, inputs: torch.Tensor, y: torch.Tensor,
               cuda: bool) -> Callable[[], None]:
    """One AdamW step of ``net`` on one batch (forward, backward, step), as a callable; ``net`` is put in train mode."""
    net.train()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(net(inputs), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_train_steps(net: torch.nn.Module, params: Any, inputs: torch.Tensor, y: torch.Tensor, steps: int,
                     cuda: bool) -> list[float]:
    """Seconds of each of ``steps`` AdamW steps of ``net`` on one batch, after a warm-up step (which also makes the
    optimiser's state, so it counts in the peak memory)."""
    step = train_step(net, params, inputs, y, cuda)
    step()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def peak_memory(run: Callable[[], Any], cuda: bool) -> tuple[Any, int]:
    """``run()`` and the bytes of memory it added at its peak: on CUDA the allocator's peak, on the CPU the resident
    set size sampled every millisecond, both above what the process held when it started."""
    if cuda:  # no sampling thread on CUDA: it would contend for the GIL with the loop that launches the kernels
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        return run(), torch.cuda.max_memory_allocated() - before
    with PeakRSS() as rss:
        start_rss = rss.peak
        out = run()
    return out, rss.peak - start_rss


def one_method(label: str, backbone_name: str, batch: int, steps: int, device: str) -> dict:
    """Run in the child process: time ``steps`` training steps after one warm-up step; measure peak memory. A label
    ending in ``CHECKPOINTED`` runs its method with activation checkpointing in the blocks."""
    from adaptkit.backbone import create_backbone
    from adaptkit.methods import get_method
    from adaptkit.training.checkpointing import activation_checkpointing

    checkpointing = label.endswith(CHECKPOINTED)
    method, config = SPECS[label.removesuffix(CHECKPOINTED)]
    backbone = create_backbone(backbone_name, pretrained=False, device=device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    cuda = device.startswith("cuda")

    def run() -> tuple[Any, list[float]]:  # attaching counts: the method's own tensors are part of its cost
        task = get_method(method, config).attach(backbone.model, 10)
        with activation_checkpointing(task.trunk, checkpointing):
            return task, time_train_steps(task, task.trainable_parameters(), x, y, steps, cuda)

    (task, times), peak = peak_memory(run, cuda)
    return {"time": statistics.median(times), "peak_mb": peak / 2**20, "trainable": task.num_trainable()}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("LABEL", "BACKBONE", "BATCH", "STEPS"), help=argparse_hidden())
    args = parse(parser)
    if args.child:
        label, name, batch, steps = args.child
        print(json.dumps(one_method(label, name, int(batch), int(steps), args.device)))
        return
    cases = [("vit_tiny_patch16_224", 8)]
    if not args.quick:
        cases = [("vit_tiny_patch16_224", 32), ("vit_base_patch16_224", 16)]
    steps = args.repeats or (2 if args.quick else 3)
    threads = ["--threads", str(args.threads)] if args.threads else []
    rows = []
    for name, batch in cases:
        results = {}
        for label in SPECS:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, *threads,
                   "--child", label, name, str(batch), str(steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[label] = json.loads(out.strip().splitlines()[-1])
        full = results["full"]
        for label, r in results.items():
            rows.append([name, batch, label, f"{r['trainable'] / 1e6:.2f}", f"{r['time'] * 1e3:.0f}",
                         ratio(r["time"], full["time"]), f"{r['peak_mb']:.0f}", ratio(r["peak_mb"], full["peak_mb"])])
    print(f"# training step, median of {steps} steps after a warm-up step; {machine_line()}")
    print_table(["backbone", "batch", "method", "trainable M", "step ms", "vs full", "peak MB", "vs full"], rows)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()

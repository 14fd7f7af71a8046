"""Training on a shared CPU: throughput of K trainings at once with T torch threads each.

Each training is a separate process running adapter training steps (forward, backward, AdamW) of the packaged
backbone on random batches, so the figures are about the CPU, not the data. With more threads in all than there are
free cores, OpenMP teams wait at every op's barrier for a thread whose core another process holds; ``OMP_WAIT_POLICY``
(GNU OpenMP: ``active`` spins, ``passive`` sleeps) decides whether the waiting threads burn a core while they wait.

Usage::

    python benchmarks/speed/bench_threads.py                 # K = 1, 2, 4 processes x T = 1, 2 threads (+ passive wait)
    python benchmarks/speed/bench_threads.py --steps 3 --procs 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

BACKBONE = "vit_cifar_tiny_patch4_32.adaptkit_c10"


def child(threads: int, steps: int, batch: int) -> None:
    """One training process: print its images/s over ``steps`` steps after one warm-up step."""
    import torch

    from adaptkit.backbone import create_backbone
    from adaptkit.methods import get_method

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = get_method("adapter").attach(create_backbone(BACKBONE).model, 10)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print(steps * batch / (time.perf_counter() - start))


def measure(procs: int, threads: int, wait: str | None, steps: int, batch: int) -> list[float]:
    """Start ``procs`` children at once; returns each one's images/s."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if wait:
        env["OMP_WAIT_POLICY"] = wait
    else:
        env.pop("OMP_WAIT_POLICY", None)
    cmd = [sys.executable, __file__, "--child", str(threads), "--steps", str(steps), "--batch", str(batch)]
    running = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in running]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.batch)
        return
    from common import machine_line, print_table

    cases = [(k, t, None) for k in args.procs for t in args.threads]
    cases += [(k, max(args.threads), "passive") for k in args.procs if k > 1]
    rows = []
    for k, t, wait in cases:
        rates = measure(k, t, wait, args.steps, args.batch)
        rows.append([k, t, wait or "default", f"{statistics.median(rates):.0f}", f"{sum(rates):.0f}"])
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"{machine_line()}; {os.cpu_count()} logical CPUs; load average at the end: {os.getloadavg()[0]:.1f}\n")
    print_table(["processes", "threads each", "OMP_WAIT_POLICY", "img/s per process (median)", "img/s in all"], rows)


if __name__ == "__main__":
    main()

"""How many CPU threads torch uses while training, and why the default is small.

torch's CPU kernels split each op over an OpenMP team that meets at a barrier at the end of every parallel region.
On a CPU that other jobs share, a team member often waits for a core that another process holds, and the op stalls
for a scheduler slice (milliseconds) instead of microseconds: on the project's loaded 2-core machine one training ran
4x slower with two threads than with one (benchmarks/speed/bench_threads.py, README "Training on a shared CPU"). The
default therefore leaves room for the load that is already there: the cores this process may use, minus the recent
load average, at least 1 and at most 4 (4 leaves a big machine's other cores to the data loader's workers, which
torch runs at one thread each).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["MAX_DEFAULT_THREADS", "available_cores", "default_threads", "torch_threads"]

MAX_DEFAULT_THREADS = 4


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """Threads for a training run: the cores not already busy, in [1, 4].

    Args:
        cores: the cores this process may use (default: :func:`available_cores`).
        load: the number of busy cores (default: the 1-minute load average, 0 where the OS has none).
    """
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # Windows
            load = 0.0
    cores = available_cores() if cores is None else cores
    return max(1, min(MAX_DEFAULT_THREADS, cores - round(load)))


@contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """Run the body with ``torch.set_num_threads(threads)`` and restore the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)

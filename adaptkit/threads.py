"""How many CPU threads torch uses while training, and why the default is small.

torch's CPU kernels split each op over an OpenMP team that meets at a barrier at the end of every parallel region.
On a CPU that other jobs share, a team member often waits for a core that another process holds, and the op stalls
for a scheduler slice (milliseconds) instead of microseconds: with two processes of two threads each on two cores,
each ran slower than one thread alone (benchmarks/bench_threads.py). The default therefore leaves room for the load
that is already there: the cores this process may use, minus the recent load average, at least 1 and at most 4
(a small ViT gains little beyond 4 threads, and 4 leaves a big machine's other cores to the data loader's workers,
which torch runs at one thread each).
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


def default_threads() -> int:
    """Threads for a training run: the cores not already busy (1-minute load average), in [1, 4]."""
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # Windows
        busy = 0
    return max(1, min(MAX_DEFAULT_THREADS, available_cores() - busy))


@contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """Run the body with ``torch.set_num_threads(threads)`` and restore the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)

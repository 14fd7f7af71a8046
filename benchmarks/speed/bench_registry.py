"""Registry back ends side by side: concurrent writers into one task, and the cost of opening a registry to read it.

For each ``--url`` (default: a temporary SQLite file), ``--writers`` processes add ``--adds`` versions each to one
shared task at once. It checks what the registry promises (versions 1..N with no gap or duplicate, exactly one
default, one file per row) and prints adds/s. Then it times opening the registry and listing its tasks in a fresh
engine (connect + schema check + query) against the same query on a bare SQLAlchemy engine, and says whether Alembic
was imported on that read path. Writers are forked after the imports, so process start-up is not counted.

    python benchmarks/speed/bench_registry.py --url postgresql://postgres@127.0.0.1:5432/scratch --writers 4 --adds 25

A PostgreSQL URL must name a scratch database: the benchmark leaves its task (``bench-<random>``) there.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from adaptkit.artifacts import AdapterMeta
from adaptkit.registry import Registry, TaskRow
from adaptkit.registry.db import describe, normalise_url


def _writer(url: str, adapters: str, task: str, adds: int, start: float) -> None:
    reg = Registry(url, adapter_dir=adapters)
    time.sleep(max(0.0, start - time.time()))
    for i in range(adds):
        meta = AdapterMeta(task=task, classes=["a", "b"], method="linear", method_config={}, backbone="b",
                           backbone_weights="random", backbone_fingerprint="e" * 64, backbone_params=1,
                           backbone_dim=4, data_config={})
        reg.add_version(meta, {"head.weight": torch.full((2, 4), float(i)), "head.bias": torch.zeros(2)})


def concurrent_adds(url: str, adapters: str, writers: int, adds: int) -> dict:
    """``writers`` processes adding ``adds`` versions each to one task; the figures and the checks."""
    task = f"bench-{uuid.uuid4().hex[:8]}"
    Registry(url, adapter_dir=adapters)._open(create=True)  # the schema exists before the clock starts
    ctx = multiprocessing.get_context("fork")
    start = time.time() + 1.0
    procs = [ctx.Process(target=_writer, args=(url, adapters, task, adds, start)) for _ in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    seconds = time.time() - start
    versions = Registry(url, adapter_dir=adapters).get_version(task).task.versions
    numbers = [v.version for v in versions]
    files = list((Path(adapters) / task).glob("*.safetensors"))
    return {"adds": len(numbers), "seconds": seconds, "adds_per_s": len(numbers) / seconds,
            "ok": [p.exitcode for p in procs] == [0] * writers and numbers == list(range(1, writers * adds + 1))
            and sum(v.is_default for v in versions) == 1 and len(files) == len(numbers)}


def open_and_list_ms(url: str, repeats: int) -> tuple[float, float]:
    """Median ms of Registry(url).tasks() in a fresh engine, and of the same ORM query on a bare engine."""
    adaptkit_ms, bare_ms = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        reg = Registry(url)
        reg.tasks()
        adaptkit_ms.append((time.perf_counter() - t) * 1e3)
        reg.engine.dispose()
        t = time.perf_counter()
        engine = create_engine(normalise_url(url))
        with Session(engine) as session:
            for task in session.scalars(select(TaskRow).order_by(TaskRow.name)):
                _ = [v.backbone for v in task.versions]
        bare_ms.append((time.perf_counter() - t) * 1e3)
        engine.dispose()
    return statistics.median(adaptkit_ms), statistics.median(bare_ms)


def alembic_on_read_path(url: str) -> bool:
    code = f"import sys; from adaptkit.registry import Registry; Registry({url!r}).tasks(); " \
           "print('alembic' in sys.modules)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", action="append", help="registry URL (repeat); default: a temporary SQLite file")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--adds", type=int, default=25, help="versions each writer adds")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        urls = args.url or [f"sqlite:///{tmp}/registry.db"]
        print(f"{args.writers} writers x {args.adds} adds into one task; open+list: median of {args.repeats}\n")
        print("| back end | adds/s | versions 1..N, one default, one file each | open+list ms | bare query ms "
              "| Alembic imported to read |")
        print("| --- | --- | --- | --- | --- | --- |")
        for i, url in enumerate(urls):
            adds = concurrent_adds(url, f"{tmp}/adapters{i}", args.writers, args.adds)
            ours, bare = open_and_list_ms(url, args.repeats)
            print(f"| {describe(normalise_url(url)).split(':')[0]} | {adds['adds_per_s']:.1f} "
                  f"| {'yes' if adds['ok'] else 'NO'} ({adds['adds']} rows) | {ours:.1f} | {bare:.1f} "
                  f"| {'yes' if alembic_on_read_path(url) else 'no'} |")


if __name__ == "__main__":
    main()

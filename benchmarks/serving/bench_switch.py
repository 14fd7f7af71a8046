"""Task switching: ``Predictor.activate`` between resident tasks with 1, 10 and 100 tasks loaded, and loading a
task from its ``.safetensors`` file (``Predictor.load``: registry row, file read and checks, attach)."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import base_parser, machine_line, median_time, parse, print_table, register_tasks

from adaptkit.artifacts import load_adapter
from adaptkit.inference import Predictor
from adaptkit.registry import Registry

RANK = 64


def resident_switch_us(reg: Registry, count: int, switches: int) -> float:
    """Median time of one ``activate`` in microseconds, cycling through ``count`` resident tasks."""
    predictor = Predictor(reg, device="cpu")
    refs = [f"t{i}" for i in range(count)]
    for ref in refs:
        predictor.load(ref)
    order = [refs[i % count] for i in range(switches)]
    for ref in order[:100]:  # warm-up
        predictor.activate(ref)
    times = []
    for ref in order:
        start = time.perf_counter_ns()
        predictor.activate(ref)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def from_file_ms(reg: Registry, repeats: int) -> tuple[float, float]:
    """Median ms of ``unload`` + ``load`` of a resident backbone's task, and of reading its file alone."""
    predictor = Predictor(reg, device="cpu")
    predictor.load("t1")  # the backbone is resident; only the adapter comes from its file

    def reload() -> None:
        predictor.unload("t0")
        predictor.load("t0")

    row = reg.get_version("t0")
    path = reg.path_of(row)
    read = median_time(lambda: load_adapter(path, sha256=row.sha256), repeats) * 1e3
    return median_time(reload, repeats) * 1e3, read


def main() -> None:
    args = parse(base_parser(__doc__.splitlines()[0]))
    name = "vit_tiny_patch16_224" if args.quick else "vit_base_patch16_224"
    counts = [1, 10] if args.quick else [1, 10, 100]
    repeats = args.repeats or (5 if args.quick else 20)
    switches = 2000 if args.quick else 20000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry(Path(tmp) / "reg.db")
        register_tasks(reg, name, [(f"t{i}", "adapter", {"rank": RANK}, 10) for i in range(max(counts))])
        for count in counts:
            switch = resident_switch_us(reg, count, switches)
            rows.append([name, f"resident switch, {count} task(s) loaded", f"{switch:.2f} us"])
        load, read = from_file_ms(reg, repeats)
        size = reg.get_version("t0").bytes / 2**20
        rows.append([name, f"load adapter r{RANK} from file ({size:.1f} MB): unload + load", f"{load:.1f} ms"])
        rows.append([name, "  of which reading and checking the file", f"{read:.1f} ms"])
    print(f"# switching, medians; {machine_line()}")
    print_table(["backbone", "operation", "time"], rows)


if __name__ == "__main__":
    main()

"""Speed guard: the figures of issue 39 with their spread, beside the committed ones, flagging any that got worse.

Run it before committing a change to the methods, the sites, the predictor, the gate, the cache or the training loop
(``python benchmarks/speed/guard.py``, a few minutes on an idle CPU), and give its table in the note. It is not a test:
the machine may be shared.

Every figure is measured in rounds: one call of each configuration per round, in turn, so that a slow spell hits
both sides of a ratio alike; a ratio is taken per round and the table gives the median and the min-max over rounds.
The process is pinned to one core (where the OS allows) with one torch thread, and the timed figures are the calling
thread's CPU time (``time.thread_time``): on one thread that is the wall time of an idle machine, and time the OS
gives to other processes does not count, so a busy machine moves the figures far less than wall time would. A round
calls each side ``--best-of`` times, interleaved, and keeps each side's least time (noise only ever adds). The load
figure is the CPU time of all the process's threads (``time.process_time``), beside its wall-clock time, so work
moved to a helper thread is not shown as a gain. The LoRA overheads over the bare backbone are also given as
differences (ms), adaptkit's and PEFT's, per round. Peak memory comes from ``bench_train_step.py``'s child processes
(fresh ones, RSS sampled every millisecond).

A figure is flagged ``WORSE`` when its median exceeds the committed median by more than the committed spread (max -
min). ``--save`` writes the run to ``benchmarks/results/guard.json`` (one entry per backbone and batch).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/, for common
sys.path.insert(0, str(HERE))  # the speed scripts whose pieces are reused
from bench_peft import peft_model  # noqa: E402
from bench_train_step import CHECKPOINTED, train_step  # noqa: E402
from common import base_parser, machine_line, parse, register_tasks  # noqa: E402

from adaptkit.backbone import create_backbone  # noqa: E402
from adaptkit.inference import Predictor  # noqa: E402
from adaptkit.methods import get_method  # noqa: E402
from adaptkit.registry import Registry  # noqa: E402
from adaptkit.training.checkpointing import activation_checkpointing  # noqa: E402

RESULTS = HERE.parent / "results" / "guard.json"
# key -> (what it is, goal or None); every figure is better lower
FIGURES = {
    "switch_us": ("switch among {tasks} resident LoRA tasks (us, per activate)", 1.0),
    "load_ms": ("load a ViT-B r=64 adapter from its file: unload + load (ms, CPU of all threads)", 10.0),
    "load_wall_ms": ("the same, wall-clock ms (pinned to one core: a helper thread cannot hide work)", 10.0),
    "train_ratio": ("adapter r=64 train step vs full fine-tuning step", 0.67),
    "memory_ratio": ("peak memory growth while training, adapter vs full", None),
    "train_ckpt_ratio": ("adapter r=64 train step with activation checkpointing vs full", None),
    "memory_ckpt_ratio": ("peak memory growth, adapter with activation checkpointing vs full", 0.50),
    "inference_ratio": ("inference, adapter r=64 task vs bare backbone", 1.036),
    "mixed_ratio": ("mixed batch of 8 adapter tasks vs one task", 1.02),
    "lora_vs_peft": ("LoRA r=8 mixed batch of 8 tasks, adaptkit vs PEFT adapter_names", 1.00),
    "lora_overhead": ("the same, adaptkit's overhead over the bare backbone vs PEFT's (per round)", 0.50),
    "lora_overhead_ms": ("adaptkit's LoRA mixed batch minus the bare backbone (ms, per round)", None),
    "peft_overhead_ms": ("PEFT's adapter_names batch minus the bare backbone (ms, per round; reference)", None),
}
REFERENCE = {"peft_overhead_ms"}  # not adaptkit's: shown, never flagged


def pin_one_core(core: int | None) -> str:
    """Pin this process (and its children) to one core; says which, or why not."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (this OS has no sched_setaffinity)"
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[-1] if core is None else core
    os.sched_setaffinity(0, {chosen})
    return f"pinned to core {chosen} of {len(allowed)}"


def cpu_seconds(fn: Callable[[], object], clock: Callable[[], float] = time.thread_time) -> float:
    """The calling thread's CPU seconds for ``fn()`` (or ``clock``'s), with the garbage collector off (as ``timeit``
    does): a full collection walks every object a figure before left, e.g. 1,000 tasks' modules, and made the load
    figure 60 % higher after the switch figure than alone."""
    gc.disable()
    try:
        start = clock()
        fn()
        return clock() - start
    finally:
        gc.enable()


def in_rounds(fns: dict[str, Callable[[], object]], rounds: int, best_of: int = 1) -> dict[str, list[float]]:
    """CPU seconds of each callable per round, after one warm-up round. A round calls each callable ``best_of``
    times, interleaved (a, b, c, a, b, c ...), and keeps each one's least time: another process slows a call, never
    speeds it up, so the least of a few interleaved calls is the steadiest estimate of a side's own cost."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):
        best = {k: float("inf") for k in fns}
        for _ in range(best_of if r else 1):
            for label, fn in fns.items():
                best[label] = min(best[label], cpu_seconds(fn))
        if r:
            for label in fns:
                times[label].append(best[label])
    return times


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(v, 6) for v in values]}


def switch_figure(tasks: int, rounds: int) -> list[float]:
    """Per round: the CPU time of one ``activate``, from a loop over all ``tasks`` resident LoRA tasks (median of 9
    loops). The backbone is the pico ViT: switching does not depend on its size."""
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        reg = Registry(Path(tmp) / "reg.db")
        refs = [f"t{i}" for i in range(tasks)]
        register_tasks(reg, "vit_pico_patch4_32", [(r, "lora", {"rank": 8}, 10) for r in refs])
        predictor = Predictor(reg, device="cpu")
        for r in refs:
            predictor.load(r)

        def loop() -> None:
            for r in refs:
                predictor.activate(r)

        loop()
        return [statistics.median(cpu_seconds(loop) for _ in range(9)) / tasks * 1e6 for _ in range(rounds)]


def load_figure(rounds: int, best_of: int) -> dict[str, list[float]]:
    """Per round: ms of ``unload`` + ``load`` of a ViT-B adapter r=64 on its resident backbone (the least of
    ``best_of``), as the CPU time of all the process's threads (work moved to a helper thread still counts) and as
    wall-clock time."""
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        reg = Registry(Path(tmp) / "reg.db")
        register_tasks(reg, "vit_base_patch16_224", [(f"t{i}", "adapter", {"rank": 64}, 10) for i in range(2)])
        predictor = Predictor(reg, device="cpu")
        predictor.load("t1")  # the backbone is resident; only the adapter comes from its file

        def reload() -> None:
            predictor.unload("t0")
            predictor.load("t0")

        reload()
        out: dict[str, list[float]] = {"load_ms": [], "load_wall_ms": []}
        for _ in range(rounds):
            cpu = min(cpu_seconds(reload, time.process_time) for _ in range(best_of))
            wall = min(cpu_seconds(reload, time.perf_counter) for _ in range(best_of))
            out["load_ms"].append(cpu * 1e3)
            out["load_wall_ms"].append(wall * 1e3)
        return out


def train_figure(name: str, batch: int, rounds: int, best_of: int) -> dict[str, list[float]]:
    """Per round: an adapter r=64 training step's CPU time over a full fine-tuning step's (one backbone, one batch),
    and the same with activation checkpointing in the blocks."""
    backbone = create_backbone(name, pretrained=False)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
    adapter = get_method("adapter", {"rank": 64}).attach(backbone.model, 10)
    full = get_method("full", {}).attach(backbone.model, 10)
    step = train_step(adapter, adapter.trainable_parameters(), x, y, False)

    def checkpointed() -> None:
        with activation_checkpointing(adapter.trunk):
            step()

    times = in_rounds({"adapter": step, "checkpointed": checkpointed,
                       "full": train_step(full, full.trainable_parameters(), x, y, False)}, rounds, best_of)
    return {"train_ratio": [a / f for a, f in zip(times["adapter"], times["full"], strict=True)],
            "train_ckpt_ratio": [c / f for c, f in zip(times["checkpointed"], times["full"], strict=True)]}


def memory_figure(name: str, batch: int, rounds: int) -> dict[str, list[float]]:
    """Per round: peak memory growth of an adapter r=64 training run (and of one with activation checkpointing) over
    full fine-tuning's, each in a fresh process (``bench_train_step.py --child``)."""

    def peak(label: str) -> float:
        cmd = [sys.executable, str(HERE / "bench_train_step.py"), "--device", "cpu", "--threads", "1",
               "--child", label, name, str(batch), "1"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["peak_mb"]

    out: dict[str, list[float]] = {"memory_ratio": [], "memory_ckpt_ratio": []}
    for _ in range(rounds):
        full = peak("full")
        out["memory_ratio"].append(peak("adapter parallel r64") / full)
        out["memory_ckpt_ratio"].append(peak("adapter parallel r64" + CHECKPOINTED) / full)
    return out


def pass_figures(name: str, batch: int, rounds: int, best_of: int) -> dict[str, list[float]]:
    """Per round, on one backbone: an adapter task's pass and a mixed batch of 8 adapter tasks (``Predictor``), a
    mixed batch of 8 LoRA r=8 tasks, PEFT's ``adapter_names`` on the same tasks' shapes, and the bare backbone."""
    refs = [f"a{i}" for i in range(8)]
    loras = [f"l{i}" for i in range(8)]
    mixed = [refs[b % 8] for b in range(batch)]
    mixed_lora = [loras[b % 8] for b in range(batch)]
    x = torch.randn(batch, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        reg = Registry(Path(tmp) / "reg.db")
        backbone = register_tasks(reg, name, [(r, "adapter", {"rank": 64}, 10) for r in refs] +
                                  [(r, "lora", {"rank": 8, "alpha": 16.0}, 10) for r in loras])
        bare = copy.deepcopy(backbone.model).eval()
        peft = peft_model(backbone.model, 8, 8)
        predictor = Predictor(reg, device="cpu")
        for r in refs + loras:
            predictor.load(r)
        t = in_rounds({"bare": lambda: bare(x), "one": lambda: predictor.logits(x, refs[0]),
                       "mixed": lambda: predictor.logits_mixed(x, mixed),
                       "lora": lambda: predictor.logits_mixed(x, mixed_lora),
                       "peft": lambda: peft(x, adapter_names=[f"t{i % 8}" for i in range(batch)])}, rounds, best_of)
    per = list(zip(t["bare"], t["one"], t["mixed"], t["lora"], t["peft"], strict=True))
    return {"inference_ratio": [one / b for b, one, *_ in per],
            "mixed_ratio": [m / one for _, one, m, *_ in per],
            "lora_vs_peft": [lo / p for *_, lo, p in per],
            "lora_overhead": [(lo - b) / (p - b) for b, _, _, lo, p in per],
            "lora_overhead_ms": [(lo - b) * 1e3 for b, _, _, lo, p in per],
            "peft_overhead_ms": [(p - b) * 1e3 for b, _, _, lo, p in per]}


def compare(now: dict, before: dict | None) -> list[list[str]]:
    rows = []
    for key, fig in now.items():
        what, goal = FIGURES[key]
        cell = f"{fig['median']:.3f} [{fig['min']:.3f}-{fig['max']:.3f}]"
        old, flag = (before or {}).get(key), ""
        if old is not None and key not in REFERENCE:
            spread = old["max"] - old["min"]
            if fig["median"] - old["median"] > spread:
                flag = f"WORSE (+{fig['median'] - old['median']:.3f} > spread {spread:.3f})"
        goal_cell = "" if goal is None else f"<= {goal}" + (" ok" if fig["median"] <= goal else " MISSED")
        old_cell = "-" if old is None else f"{old['median']:.3f} [{old['min']:.3f}-{old['max']:.3f}]"
        rows.append([what, old_cell, cell, goal_cell, flag])
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_small_patch16_224", help="the backbone of the pass figures")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure (default 10; --quick 4)")
    parser.add_argument("--best-of", type=int, default=None,
                        help="calls of each side per round, the least kept (default 3 for load and passes, 1 for "
                             "train: its steps take seconds)")
    parser.add_argument("--tasks", type=int, default=1000, help="resident tasks to switch among")
    parser.add_argument("--core", type=int, default=None, help="the core to pin to (default: the last allowed)")
    parser.add_argument("--only", nargs="+", choices=["switch", "load", "train", "memory", "passes"])
    parser.add_argument("--save", action="store_true", help="write this run to benchmarks/results/guard.json")
    parser.add_argument("--note", default="", help="saved with the run (e.g. 'machine busy')")
    args = parse(parser)
    if args.quick:
        args.backbone, args.batch = "vit_tiny_patch16_224", 8
    rounds = args.rounds or (4 if args.quick else 10)
    pinned = pin_one_core(args.core)
    torch.set_num_threads(1)
    only = set(args.only or ["switch", "load", "train", "memory", "passes"])
    figures: dict[str, list[float]] = {}
    started = time.perf_counter()
    def say(what: str) -> None:
        gc.collect()  # what the figure before left is not collected inside this one's timing
        print(f"# {time.perf_counter() - started:.0f} s: {what}", file=sys.stderr, flush=True)

    if "switch" in only:
        figures["switch_us"] = switch_figure(args.tasks, rounds)
    if "load" in only:
        say("load")
        figures.update(load_figure(rounds, args.best_of or 3))
    if "train" in only:
        say("train")
        figures.update(train_figure(args.backbone, args.batch, rounds, args.best_of or 1))
    if "memory" in only:
        say("memory")
        figures.update(memory_figure(args.backbone, args.batch, max(2, rounds // 4)))
    if "passes" in only:
        say("passes")
        figures.update(pass_figures(args.backbone, args.batch, rounds, args.best_of or 3))
    now = {k: summary(v) for k, v in figures.items()}

    key = f"{args.backbone} batch {args.batch}"
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    before = saved.get(key, {}).get("figures")
    FIGURES["switch_us"] = (FIGURES["switch_us"][0].format(tasks=args.tasks), FIGURES["switch_us"][1])
    print(f"# speed guard, {key}, {rounds} rounds, CPU time of the calling thread; {pinned}; {machine_line()}; "
          f"{time.perf_counter() - started:.0f} s")
    if before:
        print(f"# committed: {saved[key]['date']}, {saved[key]['machine']}; {saved[key].get('note', '')}")
    from common import print_table

    print_table(["figure", "committed median [min-max]", "now median [min-max]", "goal", "flag"], compare(now, before))
    if "lora_overhead_ms" in now:  # the ratio of the two medians: steadier than the median of per-round ratios
        print(f"\nLoRA overhead vs PEFT's, ratio of the median differences: "
              f"{now['lora_overhead_ms']['median'] / now['peft_overhead_ms']['median']:.3f}")
    if args.save:
        saved[key] = {"date": date.today().isoformat(), "machine": f"{machine_line()}; {pinned}", "rounds": rounds,
                      "note": args.note, "figures": {**(before or {}), **now}}
        RESULTS.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()

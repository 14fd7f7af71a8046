"""Shared pieces of the benchmarks: register random tasks, time a callable, print a table.

Every benchmark uses random-weight backbones (``pretrained=False``), so nothing is downloaded and the figures measure
speed only. Times are the median of several repeats after warm-up runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import date
from typing import Any

import torch

from adaptkit.artifacts import AdapterMeta
from adaptkit.backbone import Backbone, create_backbone
from adaptkit.methods import TaskModel, get_method, merge_lora, merge_ssf, unwrap
from adaptkit.registry import Registry
from adaptkit.trunk import run_prefix

__all__ = ["METHOD_SPECS", "randomize", "method_runs", "task_meta", "register_task", "register_tasks", "median_time",
           "round_robin", "ratio", "print_table", "machine_line", "base_parser", "parse", "sync", "block_features",
           "lbfgs_linear"]

# name -> (method, config): the configurations the benchmarks compare
METHOD_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "adapter parallel r64": ("adapter", {"rank": 64, "placement": "parallel"}),
    "adapter sequential r64": ("adapter", {"rank": 64, "placement": "sequential"}),
    "adapter houlsby r64": ("adapter", {"rank": 64, "placement": "houlsby"}),
    "lora r8 qkv": ("lora", {"rank": 8}),
    "adapter+ r8": ("adapter", {"placement": "adapterplus"}),
    "ssf": ("ssf", {}),
    "bitfit": ("bitfit", {}),
    "vpt deep 10": ("vpt", {"tokens": 10}),
    "linear": ("linear", {}),
}


@torch.no_grad()
def randomize(task: TaskModel, std: float = 0.05) -> None:
    """Give a task non-trivial weights: its own modules drawn afresh; a full copy of the trunk only perturbed."""
    for name, p in task.named_trainable_parameters():
        if name.startswith("backbone."):
            p.add_(torch.randn_like(p) * 0.01)
        else:
            torch.nn.init.normal_(p, std=std)


def method_runs(trunk: torch.nn.Module, label: str, method: str, config: dict) -> dict[str, torch.nn.Module]:
    """The task of one :data:`METHOD_SPECS` row attached to ``trunk`` (random weights, eval mode), and its merged
    copy where the method merges: label -> model to time."""
    task = get_method(method, config).attach(trunk, 10)
    randomize(task)
    task.eval()
    runs: dict[str, torch.nn.Module] = {label: task}
    if method == "lora":
        runs["lora r8 qkv, merged"] = merge_lora(task)
    if method == "ssf":
        runs["ssf, merged"] = merge_ssf(task)
    return runs


def task_meta(backbone: Backbone, task: str, model: TaskModel, num_classes: int) -> AdapterMeta:
    """The metadata of ``model``, a task with classes ``c0 ..`` on ``backbone``, trained on no data set."""
    return AdapterMeta(task=task, classes=[f"c{i}" for i in range(num_classes)], method=model.method.name,
                       method_config=model.method.config_dict(), backbone=backbone.name,
                       backbone_weights=backbone.weights, backbone_fingerprint=backbone.fingerprint,
                       backbone_params=backbone.num_params, backbone_dim=backbone.embed_dim,
                       data_config=backbone.data_config, dataset="random", metrics={})


def register_task(reg: Registry, backbone: Backbone, task: str, method: str, config: dict[str, Any] | None = None,
                  num_classes: int = 10, seed: int = 0) -> TaskModel:
    """Attach a randomly initialised task to ``backbone``, write it to ``reg`` and take it off the backbone again."""
    torch.manual_seed(seed)
    model = get_method(method, config).attach(backbone.model, num_classes)
    randomize(model)
    reg.add_version(task_meta(backbone, task, model, num_classes), model.state())
    model.detach_from_trunk()
    unwrap(backbone.model)
    return model


def register_tasks(reg: Registry, backbone_name: str,
                   specs: Iterable[tuple[str, str, dict[str, Any], int]]) -> Backbone:
    """Register ``(task, method, config, num_classes)`` tasks on a random ``backbone_name``; returns the backbone."""
    backbone = create_backbone(backbone_name, pretrained=False)
    for i, (task, method, config, num_classes) in enumerate(specs):
        register_task(reg, backbone, task, method, config, num_classes, seed=i)
    return backbone


def lbfgs_linear(x: torch.Tensor, y: torch.Tensor, classes: int, *, max_iter: int, l2: float) -> torch.nn.Linear:
    """A linear classifier of features ``x`` (standardise them first) fitted by L-BFGS to cross-entropy plus
    ``l2`` times the squared weights, from a seeded initialisation: the probes the routing benchmarks compare with."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def block_features(trunk: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ViT's features of a batch: ``final`` (B, d) its pooled output (what a linear probe and the router read),
    ``cls`` and ``avg`` (B, depth, d) the class token and the mean patch token after each block."""
    h, cls, avg = run_prefix(trunk, x, 0), [], []
    for block in trunk.blocks:
        h = block(h)
        cls.append(h[:, 0])
        avg.append(h[:, 1:].mean(1))
    return {"final": trunk.forward_head(trunk.norm(h), pre_logits=True), "cls": torch.stack(cls, 1),
            "avg": torch.stack(avg, 1)}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, timed one call of each per round after one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for round_ in range(repeats + 1):
        for label, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_:
                times[label].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table, so the output can be pasted into the README as is."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in cells[1:]:
        print(line(r))


def machine_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu}, {threads} threads"
    return f"{device}; torch {torch.__version__}; {date.today().isoformat()}"


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: small model, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (median is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice); 1 avoids OpenMP stalls on a busy CPU")
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line and apply ``--threads``."""
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args

"""Inference and serving speed through ``Predictor`` (bf16 autocast on CUDA), ViT-B/16 at 224 (tiny: ViT-Pico):

- ``inference``: images/s of the bare backbone, one task (adapter r=64), mixed batches over 8 / 100 / 1,000 resident
  tasks (adapter r=8: 1,000 files of r=64 would be 9 GB), routed prediction over 10 tasks (``predict_auto``);
- ``serving``: ``AdapterCache.predict_mixed`` from PIL images (preprocessing included) over a stream of requests for
  1 and 1,000 tasks, after a warm-up that asks for every task once (bench_serve's stream and batching).

The registry of the many tasks is written once per run and shared by both parts.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from bench_routing import register_routed
from bench_serve import serve_stream, stream
from common import randomize, register_task, round_robin, task_meta
from PIL import Image

from adaptkit.backbone import create_backbone
from adaptkit.inference import Predictor
from adaptkit.methods import get_method, unwrap
from adaptkit.registry import Registry
from adaptkit.serving.cache import AdapterCache

if TYPE_CHECKING:
    from run import Context


def sizes(ctx: Context) -> dict:
    if ctx.tiny:
        return {"backbone": "vit_pico_patch4_32", "batch": 16, "resident": (2, 5, 10), "routed": 4, "serving": (1, 10),
                "requests": 64, "serve_batch": 16, "repeats": 2}
    return {"backbone": "vit_base_patch16_224", "batch": 256, "resident": (8, 100, 1000), "routed": 10,
            "serving": (1, 1000), "requests": 2048, "serve_batch": 64, "repeats": 5}


def many_tasks(ctx: Context) -> Path:
    """The shared registry: ``t0 ..`` adapter r=8 tasks (as many as the largest count), ``one`` adapter r=64, and
    ``routed0 ..`` adapter r=64 tasks with routing statistics; built once per run (``done`` marks it complete)."""
    s = sizes(ctx)
    db = ctx.work / "many" / "registry.db"
    if (db.parent / "done").is_file():
        return db
    db.parent.mkdir(exist_ok=True)
    reg = Registry(db)
    backbone = create_backbone(s["backbone"], weights=ctx.random_weights(s["backbone"]))
    model = get_method("adapter", {"rank": 8}).attach(backbone.model, 10)
    for i in range(max(*s["resident"], *s["serving"])):  # one task attached, drawn afresh for each file
        torch.manual_seed(i)
        randomize(model)
        reg.add_version(task_meta(backbone, f"t{i}", model, 10), model.state())
    model.detach_from_trunk()
    unwrap(backbone.model)
    register_task(reg, backbone, "one", "adapter", {"rank": 64})
    x = torch.randn(s["routed"], *backbone.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    register_routed(reg, backbone, [f"routed{i}" for i in range(s["routed"])], 10, 64, x)
    (db.parent / "done").touch()
    return db


def run_inference(ctx: Context) -> None:
    s = sizes(ctx)
    tick = time.perf_counter()
    predictor = Predictor(Registry(many_tasks(ctx)), device=ctx.device)
    built = time.perf_counter() - tick
    backbone = predictor.load("one").host.backbone
    x = torch.randn(s["batch"], *backbone.data_config["input_size"], device=ctx.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.cuda)

    def bare() -> None:
        with torch.inference_mode(), autocast:
            backbone.model(x)

    cases = {"bare backbone": bare, "one task (adapter r64)": lambda: predictor.logits(x, "one")}
    tick = time.perf_counter()
    for count in s["resident"]:
        refs = [f"t{i}" for i in range(count)]
        for r in refs:
            predictor.load(r)
        rng = random.Random(count)
        mixed = [rng.choice(refs) for _ in range(s["batch"])]
        cases[f"mixed batch, {count} resident tasks (adapter r8)"] = lambda m=mixed: predictor.logits_mixed(x, m)
    loaded = time.perf_counter() - tick
    routed = [f"routed{i}" for i in range(s["routed"])]
    images = list(x)
    cases[f"routed over {len(routed)} tasks (predict_auto)"] = lambda: predictor.predict_auto(images, tasks=routed,
                                                                                           accept_all=True)
    times = round_robin(cases, s["repeats"])
    rows = [[label, f"{t * 1e3:.1f}", f"{s['batch'] / t:,.0f}"] for label, t in times.items()]
    ctx.sink.table("inference", ["what", "ms per batch", "images/s"], rows,
                   f"{s['backbone']}, random weights, batch {s['batch']}, median of {s['repeats']} rounds; "
                   f"registry built in {built:.0f} s, {max(s['resident'])} tasks loaded in {loaded:.0f} s")


def run_serving(ctx: Context) -> None:
    s = sizes(ctx)
    db = many_tasks(ctx)
    rows, images = [], []
    for tasks in s["serving"]:
        predictor = Predictor(Registry(db), device=ctx.device)
        size = predictor.load("one").host.backbone.data_config["input_size"][-1]
        rng = np.random.default_rng(0)
        images = images or [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(64)]
        cache = AdapterCache(predictor, cache_mb=4096, resolve_ttl_s=60)
        tick = time.perf_counter()
        serve_stream("batched", cache, images, [f"t{i}" for i in range(tasks)], s["serve_batch"])  # every task once
        warm = time.perf_counter() - tick
        before = cache.stats()
        refs = stream(tasks, s["requests"], "uniform", seed=tasks)
        tick = time.perf_counter()
        latencies = sorted(serve_stream("batched", cache, images, refs, s["serve_batch"]))
        wall = time.perf_counter() - tick
        after = cache.stats()
        asked = (after.hits + after.misses) - (before.hits + before.misses)
        rows.append([tasks, len(refs), f"{len(refs) / wall:,.0f}", f"{latencies[len(latencies) // 2] * 1e3:.0f}",
                     f"{latencies[int(0.99 * (len(latencies) - 1))] * 1e3:.0f}",
                     f"{(after.hits - before.hits) / max(asked, 1):.0%}", f"{after.resident_mb:.0f}", f"{warm:.1f}"])
        cache.close()
        ctx.sink.table("serving through AdapterCache", ["tasks", "requests", "requests/s", "p50 ms", "p99 ms",
                                                        "cache hits", "resident MiB", "warm-up s"], rows,
                       f"{s['backbone']}, adapter r8, PIL images {size}x{size} (preprocessing included), batches of "
                       f"{s['serve_batch']} requests spread uniformly over the tasks, prefetch on")

"""Training throughput: ViT-B/16 at 224 (tiny: ViT-Pico at 32), random weights, images made on the device, through
the training loop's own step (:func:`adaptkit.training.loop.train_step`: autocast, float32 loss, backward, gradient
clipping, AdamW): adapter r=64, LoRA r=8, full fine-tuning, and HF PEFT's LoRA r=8 on the same timm model with a head.

Images per second over timed steps with no sync between them (one at each end), and the peak memory the method adds
(``torch.cuda.max_memory_allocated``; the CPU: resident set size), at two batch sizes eagerly and at the larger one
under ``torch.compile`` (tiny: the ``aot_eager`` backend, which traces the same graphs without a C++ compiler). The
goal on an H100: adapter >= 10,000 images/s.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from bench_peft import peft_model
from bench_train_step import peak_memory
from common import sync

from adaptkit.backbone import Backbone, create_backbone
from adaptkit.methods import get_method, unwrap
from adaptkit.training import TrainConfig
from adaptkit.training.loop import make_optimizer, train_step

if TYPE_CHECKING:
    from run import Context

METHODS = {"adapter r64": ("adapter", {"rank": 64}), "lora r8": ("lora", {"rank": 8}), "full": ("full", {})}
GOAL = 10_000


def adaptkit_net(backbone: Backbone, method: str, config: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                                          list, TrainConfig, Callable[[], None]]:
    """A task of ``method`` on ``backbone`` as the training loop builds it; the last item takes it off again."""
    task = get_method(method, config).attach(backbone.model, 10)
    cfg = TrainConfig().resolved(method)

    def remove() -> None:
        task.detach_from_trunk()
        unwrap(backbone.model)

    return task, make_optimizer(task, cfg), list(task.trainable_parameters()), cfg, remove


def peft_net(backbone: Backbone) -> tuple[torch.nn.Module, torch.optim.Optimizer, list, TrainConfig,
                                          Callable[[], None]]:
    """PEFT's LoRA r=8 on the qkv projections of a copy of the same timm model, with a linear head."""
    net = torch.nn.Sequential(peft_model(backbone.model, 1, 8), torch.nn.Linear(backbone.embed_dim, 10))
    net.to(backbone.device)
    params = [p for p in net.parameters() if p.requires_grad]
    cfg = TrainConfig().resolved("lora")
    return net, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay), params, cfg, lambda: None


def measure(build: Callable[[], tuple], x: torch.Tensor, y: torch.Tensor, steps: int, compile_: str | None,
            device: torch.device) -> tuple[float, float]:
    """(images/s, peak MiB) of ``steps`` training steps after warm-up steps (the compiling ones, if compiled)."""
    cuda = device.type == "cuda"
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=TrainConfig().label_smoothing)
    remove: Callable[[], None] = lambda: None  # noqa: E731

    def run() -> float:
        nonlocal remove
        net, optimizer, params, cfg, remove = build()
        net.train()
        step_net = torch.compile(net, backend=compile_) if compile_ else net
        for _ in range(3 if compile_ else 2):
            train_step(step_net, x, y, optimizer, criterion, params, cfg, device)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            train_step(step_net, x, y, optimizer, criterion, params, cfg, device)
        sync()
        return len(x) * steps / (time.perf_counter() - start)

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    try:
        rate, peak = peak_memory(run, cuda)
    finally:
        remove()
        if compile_:
            torch._dynamo.reset()
    return rate, peak / 2**20


def run(ctx: Context) -> None:
    device = torch.device(ctx.device)
    name, size = ("vit_pico_patch4_32", 32) if ctx.tiny else ("vit_base_patch16_224", 224)
    batches = (8, 16) if ctx.tiny else (128, 256)
    steps = 2 if ctx.tiny else 10
    compiler = "aot_eager" if ctx.tiny else "inductor"
    backbone = create_backbone(name, weights=ctx.random_weights(name), device=device)
    builders = {label: (lambda m=m, c=c: adaptkit_net(backbone, m, c)) for label, (m, c) in METHODS.items()}
    builders["peft lora r8"] = lambda: peft_net(backbone)
    cases = [(b, None) for b in batches] + [(batches[-1], compiler)]
    rows, rates = [], {}
    for batch, compile_ in cases:  # eager first: a slow compile costs only the compiled rows
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        for label, build in builders.items():
            try:
                rate, peak = measure(build, x, y, steps, compile_, device)
                rates[(label, batch, compile_)] = rate
                row = [f"{rate:,.0f}", f"{peak:,.0f}"]
            except Exception as exc:  # noqa: BLE001  (one configuration's failure is a row, not the part's end)
                row = ["failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}" if str(exc) else ""]
            rows.append([label, batch, compile_ or "eager", *row])
            ctx.sink.table("training throughput", ["method", "batch", "compile", "images/s", "peak MiB"], rows,
                           f"{name} at {size}x{size}, random weights, {'bf16 autocast' if ctx.cuda else 'fp32'}, "
                           f"{steps} timed steps after warm-up; peak memory above the backbone and the batch")
    best = max((r for (label, _, _), r in rates.items() if label == "adapter r64"), default=0.0)
    if not ctx.tiny:
        ctx.sink.table("goal", ["goal", "best adapter r64 images/s", "met"],
                       [[f"adapter >= {GOAL:,} images/s", f"{best:,.0f}", "yes" if best >= GOAL else "no"]])

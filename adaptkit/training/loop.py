"""One training loop for every method: AdamW, linear warm-up then cosine decay, label smoothing, clipping.

:func:`_fit` runs the epochs and keeps the state of the epoch with the best validation accuracy; :func:`run_eval`
measures top-1, top-5 and loss; :func:`_search_lr` runs ``lr="auto"``'s short trials through the same loop. Under
``torchrun`` or ``accelerate launch`` the loop runs data-parallel (DDP). No files and no registry here: see
:mod:`adaptkit.training.pipeline`.
"""

from __future__ import annotations

import math
import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from adaptkit.methods import TaskModel
from adaptkit.training import feature_cache
from adaptkit.training.checks import DivergenceGuard
from adaptkit.training.config import TrainConfig, TrainEvent
from adaptkit.training.lr_search import LR_FACTORS, LrSearch, search_budget, search_lr

__all__ = ["seed_everything", "lr_factor", "run_eval", "train_step", "make_optimizer", "data_parallel"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, warmup_steps: int, total_steps: int, floor: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps  # warm-up: from 1/warmup_steps up to 1
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # cosine down to the floor


def _param_groups(model: TaskModel, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and other 1-d tensors."""
    decay, no_decay = [], []
    for _, p in model.named_trainable_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _workers(cfg: TrainConfig) -> int:
    if cfg.num_workers is not None:
        return cfg.num_workers
    return min(8, (os.cpu_count() or 1) - 1) if (os.cpu_count() or 1) > 2 else 0


def _loader(data: Dataset, batch: int, shuffle: bool, cfg: TrainConfig, world: int, device: torch.device,
            seed_offset: int = 0) -> DataLoader:
    workers = 0 if isinstance(data, feature_cache.FeatureSet) else _workers(cfg)  # features: nothing to load
    sampler = DistributedSampler(data, shuffle=shuffle, seed=cfg.seed) if world > 1 and shuffle else None
    generator = torch.Generator().manual_seed(cfg.seed + seed_offset)
    return DataLoader(data, batch_size=batch, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, generator=generator, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, drop_last=False)


def _reduced_precision(device: torch.device, precision: str = "auto") -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _autocast(device: torch.device, precision: str = "auto"):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=_reduced_precision(device, precision))


@torch.no_grad()
def run_eval(model: nn.Module, loader: DataLoader, device: torch.device,
             on_step: Callable[[int, int], None] | None = None, precision: str = "auto") -> dict[str, float]:
    """Top-1, top-5 and mean cross-entropy of ``model`` over ``loader``."""
    model.eval()
    seen = top1 = top5 = 0
    loss_sum = 0.0
    for step, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, precision):
            logits = model(x).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += (ranked[:, 0] == y).sum().item()
        top5 += (ranked == y[:, None]).any(dim=1).sum().item()
        seen += y.numel()
        if on_step:
            on_step(step + 1, len(loader))
    n = max(seen, 1)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss_sum / n, "images": seen}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (Linux: KiB)


def _search_lr(model: TaskModel, data: Any, cfg: TrainConfig, method: str, device: torch.device, world: int,
               on_event: Callable[[TrainEvent], None] | None, net: nn.Module | None = None) -> LrSearch:
    """``lr="auto"``: short trials from the model's initial state (see :mod:`adaptkit.training.lr_search`).

    Every trial, and the training that follows, starts from the same weights and random state, so training with the
    chosen rate gives the same file as passing that rate by hand.
    """
    emit = on_event or (lambda e: None)
    initial = {k: v.detach().clone() for k, v in model.state().items()}
    rng = _rng_state()
    epochs, images = search_budget(cfg.epochs, len(data.train))
    subset = replace(data, train=Subset(data.train, range(images)))  # the train split is already shuffled
    trials = len(LR_FACTORS)

    def restart() -> None:
        model.load_state(initial)
        _set_rng_state(rng)

    def trial(index: int, lr: float) -> float:
        restart()
        relay = lambda e: emit(replace(e, phase="search", epoch=index + 1, epochs=trials, lr=lr))  # noqa: E731
        best, _, _ = _fit(model, subset, replace(cfg, lr=lr, epochs=epochs), device, world, relay, net)
        return best["val_top1"]

    search = search_lr(trial, replace(cfg, lr=None).resolved(method).lr, epochs, images)
    restart()
    emit(TrainEvent("lr", 0, cfg.epochs, trials, trials, accuracy=max(t.val_top1 for t in search.trials),
                    lr=search.chosen))
    return search


def _rng_state() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_state(state: tuple) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def data_parallel(world: int) -> bool:
    """Whether training runs under DDP: several processes, or one launched by ``torchrun`` (its process group
    joined, so that the same code path runs as with many)."""
    return world > 1 or (torch.distributed.is_available() and torch.distributed.is_initialized())


def train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               criterion: nn.Module, params: list[torch.Tensor], cfg: TrainConfig,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch already on ``device``: forward under autocast, loss in float32, backward,
    gradient clipping, optimiser step. Returns (logits, loss), still on the device (nothing waits for the GPU)."""
    with _autocast(device, cfg.precision):
        logits = net(x)
        loss = criterion(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    return logits, loss


def make_optimizer(model: TaskModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the task's trainable tensors (no weight decay on 1-d ones) at the recipe's rate."""
    return torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))


def _fit(model: TaskModel, data: Any, cfg: TrainConfig, device: torch.device, world: int,
         on_event: Callable[[TrainEvent], None] | None, net: nn.Module | None = None) -> tuple[dict, list, dict]:
    """The epochs: train, validate, keep the best state (``net`` maps a batch to logits: the task, or the task on
    cached features). Returns (best, history, timing)."""
    emit = on_event or (lambda e: None)
    net = net or model
    if data_parallel(world):
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_loader = _loader(data.train, cfg.batch_size, True, cfg, world, device)
    val_loader = _loader(data.val, cfg.batch_size * 2, False, cfg, 1, device, seed_offset=1)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(train_loader)
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, cfg.min_lr_ratio))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    params = list(model.trainable_parameters())
    guard = DivergenceGuard(cfg)
    best: dict[str, Any] = {"val_top1": -1.0}
    history, images, busy = [], 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        seen = correct = 0
        loss_sum = 0.0
        tick = time.perf_counter()
        for step, (x, y) in enumerate(train_loader, start=1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits, loss = train_step(net, x, y, optimizer, criterion, params, cfg, device)
            used_lr = schedule.get_last_lr()[0]
            schedule.step()
            seen += y.numel()
            step_loss = guard.loss(loss.item(), epoch, step)
            loss_sum += step_loss * y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            rate = seen * world / max(time.perf_counter() - tick, 1e-9)
            emit(TrainEvent("train", epoch, cfg.epochs, step, steps_per_epoch, loss_sum / seen, correct / seen, rate,
                            lr=used_lr, step_loss=step_loss))
        busy += time.perf_counter() - tick
        images += seen * world
        val = run_eval(net, val_loader, device,
                       lambda s, n, e=epoch: emit(TrainEvent("val", e, cfg.epochs, s, n)), cfg.precision)
        emit(TrainEvent("val", epoch, cfg.epochs, len(val_loader), len(val_loader), val["loss"], val["top1"]))
        history.append({"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_top1": correct / max(seen, 1),
                        "val_top1": val["top1"], "val_loss": val["loss"], "lr": schedule.get_last_lr()[0]})
        guard.params(model.state(), epoch, steps_per_epoch)
        if val["top1"] > best["val_top1"]:
            best = {"val_top1": val["top1"], "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state().items()}}
    timing = {"train_time_s": time.perf_counter() - started, "images_per_s": images / max(busy, 1e-9),
              "peak_memory_mb": _peak_memory_mb(device), "device": _device_name(device)}
    return best, history, timing


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'' if n == 1 else 's'})"

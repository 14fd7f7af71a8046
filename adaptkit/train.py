"""One training loop for every method: AdamW, linear warm-up then cosine decay, label smoothing, clipping.

The loop keeps the epoch with the best validation accuracy, reports test top-1/top-5 at the end and records the
version in the registry (one atomic file plus one transaction), so Ctrl-C or a crash leaves nothing half-written.
Under ``torchrun`` or ``accelerate launch`` it runs data-parallel (DDP) with no change; only rank 0 writes.
"""

from __future__ import annotations

import logging
import math
import os
import random
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from adaptkit import feature_cache, warmstart
from adaptkit.artifacts import AdapterMeta
from adaptkit.backbone import DEFAULT_BACKBONE, Backbone, create_backbone
from adaptkit.checkpointing import activation_checkpointing
from adaptkit.checks import check_int
from adaptkit.data import augment_level, load_task_data, without_builtin
from adaptkit.devices import resolve_device
from adaptkit.errors import ConfigError, DatasetError
from adaptkit.lr_search import LR_FACTORS, LrSearch, search_budget, search_lr
from adaptkit.methods import TaskModel, get_method
from adaptkit.registry import TASK_NAME, Registry, VersionRow
from adaptkit.routing import RoutingStats, collect_task_stats, task_stats_from_features
from adaptkit.threads import default_threads
from adaptkit.tracking import Trackers, check_trackers, open_trackers
from adaptkit.train_checks import DivergenceGuard, check_config, check_train_args, fit_batch

_log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainEvent", "TrainResult", "METHOD_DEFAULTS", "train", "evaluate", "seed_everything"]

# Per-method base learning rate (for a batch of 256; see `scaled_lr`) and weight decay, AdamW, after the published
# recipes, and for the adapter measured: at the default budget (10 epochs, batch 64, light augmentation) 7.5e-3 beat
# 2.5e-3 by 4 to 8 points on digits and glyphs and was within 0.6 on cifar5 (README, "Training defaults that work
# without tuning", has the sweep; `benchmarks/recipe_table.py`):
#   adapter: AdaptFormer (Chen et al. 2022) and Houlsby et al. 2019 train adapters at 1e-3 with warm-up, for far
#            longer budgets (VTAB-1k: 100 epochs); ten epochs on a thousand images are 150 steps and want more;
#   lora:    LoRA on ViTs (Hu et al. 2021; PEFT's image-classification guide) uses 1e-3 to 5e-3;
#   linear:  linear probes (MAE, He et al. 2022) use a large rate and no weight decay;
#   full:    full fine-tuning (DeiT/BEiT recipes, Touvron et al. 2021) uses 5e-5 to 1e-4 and weight decay 0.05.
#   ssf:     SSF (Lian et al. 2022) trains its scales and shifts with AdamW at 5e-3 to 1e-2 (VTAB, FGVC);
#   bitfit:  bias tuning on ViTs (V-PETL Bench; Zaken et al. 2021 use 1e-4 to 1e-3 on BERT) wants a larger rate
#            than adapters, as each bias is one vector;
#   vpt:     VPT (Jia et al. 2022) tunes prompts with large rates (SGD, base lr up to 50 x batch / 256); with AdamW
#            1e-2 is the common choice (PETL_Vision, PILOT), no weight decay on the prompts.
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "adapter": {"lr": 3e-2, "weight_decay": 1e-4},
    "lora": {"lr": 1e-2, "weight_decay": 1e-4},
    "ssf": {"lr": 2e-2, "weight_decay": 1e-4},
    "bitfit": {"lr": 2e-2, "weight_decay": 0.0},
    "vpt": {"lr": 4e-2, "weight_decay": 0.0},
    "linear": {"lr": 4e-2, "weight_decay": 0.0},
    "full": {"lr": 4e-4, "weight_decay": 0.05},
}
LR_REFERENCE_BATCH = 256


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule, lr = base_lr * batch / 256 (Goyal et al. 2017), as MAE, VPT and AdaptFormer state
    their recipes: the AdamW step is an average over the batch, so a larger batch takes fewer, less noisy steps that
    can each be larger. (A square-root rule is argued for Adam by Malladi et al. 2022; the published PETL recipes and
    our three-data-set table use the linear one.)"""
    return base_lr * batch_size / LR_REFERENCE_BATCH


@dataclass
class TrainConfig:
    """The recipe.

    ``lr`` is the peak learning rate: a number, None for the method's base rate scaled to the batch size
    (:func:`scaled_lr`), or ``"auto"`` for a short sweep on the validation split (:mod:`adaptkit.lr_search`).
    ``weight_decay`` left as None takes the method's default (:data:`METHOD_DEFAULTS`). ``augment`` is a level,
    ``none``, ``light`` or ``strong`` (``build_transform``; True/False mean light/none), with flips only if ``flip``.
    ``threads`` is torch's CPU thread count while training (None: :func:`default_threads`).
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float | str | None = None
    weight_decay: float | None = None
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str | None = None
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU; or "bf16", "fp32"
    num_workers: int | None = None
    val_fraction: float = 0.1
    augment: str | bool = "light"
    flip: bool = False
    threads: int | None = None
    crop_scale: tuple[float, float] | None = None
    limit_train: int | None = None
    limit_eval: int | None = None
    checkpointing: bool = False  # activation checkpointing in the blocks: less memory, one more forward pass
    feature_cache: bool = True  # with no augmentation, run the frozen blocks once per image (feature_cache.py)

    def __post_init__(self) -> None:
        check_config(self)
        self.augment = augment_level(self.augment)
        if self.lr == "auto" and self.val_fraction <= 0:
            raise ConfigError("lr='auto' picks the rate on the validation split: keep val_fraction above 0 "
                              "or give a learning rate")

    def resolved(self, method: str) -> TrainConfig:
        """This recipe with the method's defaults filled in (``lr="auto"`` stays for :func:`train` to search)."""
        defaults = METHOD_DEFAULTS.get(method, {})
        values = asdict(self)
        if values["lr"] is None:
            values["lr"] = scaled_lr(defaults.get("lr", 1e-3), self.batch_size)
        if values["weight_decay"] is None:
            values["weight_decay"] = defaults.get("weight_decay", 0.0)
        return TrainConfig(**values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainEvent:
    """Progress, sent to the caller's callback after every step and evaluation."""

    phase: str  # "search" (a trial of lr="auto"), "lr" (its choice), "train", "val", "test", "save"
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None = None
    accuracy: float | None = None
    images_per_s: float | None = None
    lr: float | None = None  # "train": the step's; "search": the trial's; "lr": the one the search chose
    step_loss: float | None = None  # "train": this step's loss (``loss`` is the epoch's running mean)


@dataclass
class TrainResult:
    version: VersionRow | None  # None on ranks other than 0
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    model: TaskModel | None = None
    init_from: dict[str, Any] | None = None  # the warm start, as recorded with the version


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


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun / accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _device(choice: str | None, rank: int, world: int) -> torch.device:
    device = resolve_device(choice)
    if device.type == "cuda":
        if world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
    return device


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


def _routing_stats(backbone: Backbone, data: Any, feats: Any, net: nn.Module, cfg: TrainConfig,
                   device: torch.device) -> RoutingStats:
    """The task's routing statistics: from the cached features when they are the frozen pooled features of the
    training images in full precision (the same numbers), else from one frozen pass over the images."""
    cached = feature_cache.frozen_pooled(feats, net) if not _reduced_precision(device, cfg.precision) else None
    if cached is not None:
        return task_stats_from_features(data, *cached, batch_size=cfg.batch_size * 2)
    return collect_task_stats(backbone.model, data, device, cfg.batch_size * 2)


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


def train(
    dataset: str,
    *,
    task: str | None = None,
    backbone: str | Backbone = DEFAULT_BACKBONE,
    weights: str | None = None,
    pretrained: bool = True,
    method: str = "adapter",
    method_config: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    registry: Registry | str | None = None,
    data_dir: str | None = None,
    download: bool = True,
    on_event: Callable[[TrainEvent], None] | None = None,
    classes: str | list[str] | None = None,
    init_from: str | None = None,
    log_to: str | Sequence[str] | None = None,
    log_dir: str | os.PathLike | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> TrainResult:
    """Train one task on a frozen backbone and register it as the task's next version.

    Args:
        dataset: a data set spec (``cifar100``, ``folder:PATH``, ``digits`` ...; see ``adaptkit datasets``).
        task: the task's name (default: the data set's name).
        backbone: a timm model name, or a :class:`Backbone` already built (it is shared, never changed).
        weights, pretrained: where the backbone's weights come from (see :func:`create_backbone`).
        method, method_config: the method and its settings (missing settings take their defaults).
        config: the training recipe.
        registry: where to record the version (a :class:`Registry` or URL).
        data_dir, download: where torchvision data sets live, and whether they may be downloaded.
        on_event: called with a :class:`TrainEvent` after every step and evaluation.
        classes: train on these classes of the data set only (``0-9``, ``cat,dog`` or a list of names).
        init_from: start from a registered version's adapter (``TASK``, ``TASK@N``) or the closest task
            (``auto``); see :mod:`adaptkit.warmstart`.
        log_to: experiment trackers to log the run to, ``tensorboard`` and/or ``mlflow`` (see
            :mod:`adaptkit.tracking`); the version's ``train_info["tracking"]`` records each run.
        log_dir: where the trackers write (default: TensorBoard ``runs/``, MLflow its own default).
        image_column, label_column: the columns of a Hugging Face data set (``hf:``, ``hf-disk:``, ``hf-files:``)
            where they cannot be found from its features; recorded with the version.
    """
    check_train_args(dataset, task, config, TrainConfig, pretrained=pretrained, classes=classes,
                     init_from=init_from)
    task = task or _task_name(dataset, classes)
    if not TASK_NAME.match(task):
        raise ConfigError(f"bad task name {task!r}: use letters, digits, '_', '-', '.', up to 64 characters "
                          "(pass --task NAME)")
    chosen = get_method(method, method_config)  # validates the method's settings before anything slow
    check_trackers(log_to)
    given = config or TrainConfig()
    cfg = given.resolved(chosen.name)
    rank, world = _distributed()
    device = _device(cfg.device, rank, world)
    registry = registry if isinstance(registry, Registry) else Registry(registry)
    if not isinstance(backbone, Backbone):
        backbone = create_backbone(backbone, weights=weights, pretrained=pretrained, device=device)
    backbone.model.to(device)
    data = load_task_data(dataset, backbone.data_config, data_dir=data_dir, download=download and rank == 0,
                          val_fraction=cfg.val_fraction, seed=cfg.seed, augment=cfg.augment,
                          limit_train=cfg.limit_train, limit_eval=cfg.limit_eval, crop_scale=cfg.crop_scale,
                          flip=cfg.flip, classes=classes, image_column=image_column, label_column=label_column)
    if len(data.train) < len(data.classes):
        raise DatasetError(f"{len(data.train)} training image(s) for {len(data.classes)} classes: every class needs "
                           "some, so raise --limit-train (or leave it out) or train on fewer --classes")
    registry.check_classes(task, data.classes)
    cfg = fit_batch(cfg, len(data.train))
    warm = warmstart.choose(init_from, registry=registry, backbone=backbone, method=chosen,
                            data=data) if init_from else None

    trackers = open_trackers(log_to if rank == 0 else None, run_name=task, log_dir=log_dir)
    if trackers:
        trackers.params({"task": task, "dataset": dataset, "backbone": backbone.name, "method": chosen.name,
                         "method_config": chosen.config_dict(), **asdict(cfg)})
        on_event = _both(on_event, trackers.event)
    threads = cfg.threads or default_threads()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    model = chosen.attach(backbone.model, len(data.classes))
    try:
        if warm is not None:
            warmstart.apply(model, warm, data.classes)
        started = time.perf_counter()
        feats, net = feature_cache.prepare(model, data, batch_size=cfg.batch_size * 2, workers=_workers(cfg),
                                          device=device,
                                          autocast=lambda: _autocast(device, cfg.precision),
                                          enabled=cfg.feature_cache and world == 1)
        with activation_checkpointing(model.trunk, cfg.checkpointing):
            search = _search_lr(model, feats, cfg, chosen.name, device, world, on_event, net) \
                if cfg.lr == "auto" else None
            cfg = replace(cfg, lr=search.chosen) if search else cfg
            best, history, timing = _fit(model, feats, cfg, device, world, on_event, net)
        timing["train_time_s"] = time.perf_counter() - started  # the cached pass and the search count as training
        model.load_state(best["state"])
        emit = on_event or (lambda e: None)
        test = run_eval(net, _loader(feats.test, cfg.batch_size * 2, False, cfg, 1, device), device,
                        lambda s, n: emit(TrainEvent("test", cfg.epochs, cfg.epochs, s, n)), cfg.precision)
        metrics = {"val_top1": best["val_top1"], "best_epoch": best["epoch"], "test_top1": test["top1"],
                   "test_top5": test["top5"], "test_loss": test["loss"], "test_images": test["images"]}
        version = None
        if rank == 0:
            emit(TrainEvent("save", cfg.epochs, cfg.epochs, 0, 1))
            recipe = _recipe(given, cfg, device, threads, search)
            meta = AdapterMeta(task=task, classes=data.classes, method=chosen.name,
                               method_config=chosen.config_dict(), backbone=backbone.name,
                               backbone_weights=backbone.weights, backbone_fingerprint=backbone.fingerprint,
                               backbone_params=backbone.num_params, backbone_dim=backbone.embed_dim,
                               data_config=backbone.data_config, dataset=dataset, metrics=metrics, recipe=recipe)
            stats = _routing_stats(backbone, data, feats, net, cfg, device)
            subset = {"classes": classes if isinstance(classes, str) else ",".join(classes)} if classes else {}
            subset.update({k: v for k, v in (("image_column", image_column), ("label_column", label_column)) if v})
            warm_info = {"init_from": warm.record()} if warm is not None else {}
            tracked = {"tracking": trackers.record()} if trackers else {}
            version = registry.add_version(meta, {**model.state(), **stats.to_tensors()},
                                           train_info={**timing, "recipe": recipe, "world_size": world,
                                                       "train_images": len(data.train), **subset, **warm_info,
                                                       **tracked})
            if trackers:
                _finish_tracking(trackers, registry, version, recipe, metrics)
        return TrainResult(version=version, metrics=metrics, history=history, model=model,
                           init_from=warm.record() if warm is not None else None)
    except BaseException:
        trackers.fail()
        raise
    finally:
        torch.set_num_threads(threads_before)
        if chosen.name != "full":
            model.detach_from_trunk()  # the shared backbone leaves exactly as it came


def _both(first: Callable[[TrainEvent], None] | None,
          second: Callable[[TrainEvent], None]) -> Callable[[TrainEvent], None]:
    def emit(event: TrainEvent) -> None:
        if first is not None:
            first(event)
        second(event)

    return emit


def _finish_tracking(trackers: Trackers, registry: Registry, version: VersionRow, recipe: dict,
                     metrics: dict) -> None:
    """The final metrics and the registered adapter file (from the store, as saved) to every tracker."""
    try:
        with tempfile.TemporaryDirectory(prefix="adaptkit-track-") as tmp:
            path = registry.export(version.ref, Path(tmp))
            trackers.finish(recipe, {**metrics, "ref": version.ref}, path)
    except Exception as exc:  # noqa: BLE001  (the version is registered: a tracker's failure must not hide that)
        _log.warning("%s is registered, but the trackers could not finish their runs: %s", version.ref, exc)


def _search_lr(model: TaskModel, data: Any, cfg: TrainConfig, method: str, device: torch.device, world: int,
               on_event: Callable[[TrainEvent], None] | None, net: nn.Module | None = None) -> LrSearch:
    """``lr="auto"``: short trials from the model's initial state (see :mod:`adaptkit.lr_search`).

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


def _recipe(given: TrainConfig, used: TrainConfig, device: torch.device, threads: int,
            search: LrSearch | None) -> dict[str, Any]:
    """The recipe as it ran, with the learning rate as given (None: the method's default, or "auto")."""
    recipe = {k: v for k, v in asdict(used).items() if k not in ("device", "num_workers")}
    recipe.update(lr_given=given.lr, device=device.type, threads=threads)
    if search is not None:
        recipe["lr_search"] = search.to_dict()
    return recipe


def _fit(model: TaskModel, data: Any, cfg: TrainConfig, device: torch.device, world: int,
         on_event: Callable[[TrainEvent], None] | None, net: nn.Module | None = None) -> tuple[dict, list, dict]:
    """The epochs: train, validate, keep the best state (``net`` maps a batch to logits: the task, or the task on
    cached features). Returns (best, history, timing)."""
    emit = on_event or (lambda e: None)
    net = net or model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_loader = _loader(data.train, cfg.batch_size, True, cfg, world, device)
    val_loader = _loader(data.val, cfg.batch_size * 2, False, cfg, 1, device, seed_offset=1)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
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
            with _autocast(device, cfg.precision):
                logits = net(x)
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
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
    return f"cpu ({torch.get_num_threads()} threads)"


def _task_name(spec: str, classes: str | list[str] | None = None) -> str:
    name = os.path.basename(os.path.normpath(spec[7:])) or "folder" if spec.startswith("folder:") else \
        without_builtin(spec)
    if classes:  # e.g. cifar10-0-4 or cifar10-cat_dog
        name += "-" + "_".join(c.strip() for c in (classes.split(",") if isinstance(classes, str) else classes))
    return name


def evaluate(ref: str, *, registry: Registry | str | None = None, dataset: str | None = None,
             split: str = "test", batch_size: int = 128, device: str | None = None, data_dir: str | None = None,
             limit: int | None = None, download: bool = True) -> dict[str, float]:
    """Evaluate a registered version on its data set's test split (or ``dataset``, with the same classes)."""
    from adaptkit.predict import Predictor

    if split not in ("test", "val"):
        raise ConfigError(f"split must be test or val, got {split!r}")
    check_int("batch_size", batch_size, 1)
    check_int("limit", limit, 1, optional=True)
    predictor = Predictor(registry, device=device)
    loaded = predictor.load(ref)
    spec = dataset or loaded.meta.dataset
    data = load_task_data(spec, loaded.host.backbone.data_config, data_dir=data_dir, download=download,
                          limit_eval=limit)
    if data.classes != loaded.classes:
        raise ConfigError(f"{spec} has classes {data.classes[:5]}..., but {ref} was trained on "
                          f"{loaded.classes[:5]}...: evaluate on a data set with the same classes")
    subset = {"test": data.test, "val": data.val}[split]
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False)
    predictor.activate(ref)
    return run_eval(loaded.model, loader, predictor.device)

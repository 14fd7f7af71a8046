""":func:`train`: one task on a frozen backbone, from its data to a registered version; :func:`evaluate`: a
registered version on its test split.

Training keeps the epoch with the best validation accuracy (:mod:`adaptkit.training.loop`), reports test top-1/top-5
at the end and records the version in the registry (one atomic file plus one transaction), so Ctrl-C or a crash
leaves nothing half-written. Under ``torchrun`` or ``accelerate launch`` it runs data-parallel (DDP) with no change;
only rank 0 writes.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from adaptkit.artifacts import AdapterMeta
from adaptkit.backbone import DEFAULT_BACKBONE, Backbone, BackboneSpec
from adaptkit.checks import check_int
from adaptkit.data import load_task_data, without_builtin
from adaptkit.data.roots import resolve_roots
from adaptkit.devices import resolve_device
from adaptkit.errors import ConfigError, DatasetError, param
from adaptkit.inference import RoutingStats, collect_task_stats, task_stats_from_features
from adaptkit.methods import get_method
from adaptkit.registry import TASK_NAME, Registry, VersionRow
from adaptkit.threads import default_threads, torch_threads
from adaptkit.training import feature_cache, warmstart
from adaptkit.training.checks import check_train_args, fit_batch
from adaptkit.training.config import TrainConfig, TrainEvent, TrainResult
from adaptkit.training.fitting import FitResult, fit
from adaptkit.training.loop import _reduced_precision, data_parallel, run_eval, seed_everything
from adaptkit.training.lr_search import LrSearch
from adaptkit.training.tracking import Trackers, check_trackers, open_trackers

_log = logging.getLogger(__name__)

__all__ = ["train", "evaluate"]


def _distributed(device: str | None) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun / accelerate, one process too (so
    ``torchrun --nproc_per_node 1`` runs the same DDP code path as many processes do): NCCL when training on CUDA,
    gloo otherwise (``--device cpu`` on a GPU machine too)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ
    if (world > 1 or launched) and not dist.is_initialized():
        dist.init_process_group("nccl" if resolve_device(device).type == "cuda" else "gloo")
    return (dist.get_rank(), world) if dist.is_initialized() else (0, 1)


def _device(choice: str | None, rank: int, world: int) -> torch.device:
    device = resolve_device(choice)
    if device.type == "cuda" and data_parallel(world):  # one GPU per process: the launcher's local rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return device


def _routing_stats(backbone: Backbone, data: Any, feats: Any, net: nn.Module, cfg: TrainConfig,
                   device: torch.device) -> RoutingStats:
    """The task's routing statistics: from the cached features when they are the frozen pooled features of the
    training images in full precision (the same numbers), else from one frozen pass over the images."""
    cached = feature_cache.frozen_pooled(feats, net) if not _reduced_precision(device, cfg.precision) else None
    if cached is not None:
        return task_stats_from_features(data, *cached, batch_size=cfg.batch_size * 2)
    return collect_task_stats(backbone.model, data, device, cfg.batch_size * 2)


def train(
    dataset: str,
    *,
    task: str | None = None,
    backbone: str | BackboneSpec | Backbone = DEFAULT_BACKBONE,
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
    data_roots: Sequence[str | os.PathLike] | None = None,
) -> TrainResult:
    """Train one task on a frozen backbone and register it as the task's next version.

    Args:
        dataset: a data set spec (``cifar100``, ``folder:PATH``, ``digits`` ...; see ``adaptkit datasets``).
        task: the task's name (default: the data set's name).
        backbone: a timm model name, a :class:`BackboneSpec` (name, weights and input size, e.g.
            ``BackboneSpec("vit_small_patch14_dinov2.lvd142m", image_size=224)``), or a :class:`Backbone` already
            built (it is shared, never changed). The version records the input size; it predicts at that size.
        weights, pretrained: where the backbone's weights come from, with a name (see :func:`create_backbone`).
        method, method_config: the method and its settings (missing settings take their defaults).
        config: the training recipe.
        registry: where to record the version (a :class:`Registry` or URL).
        data_dir, download: where torchvision data sets live, and whether they may be downloaded.
        on_event: called with a :class:`TrainEvent` after every step and evaluation.
        classes: train on these classes of the data set only (``0-9``, ``cat,dog`` or a list of names).
        init_from: start from a registered version's adapter (``TASK``, ``TASK@N``) or the closest task
            (``auto``); see :mod:`adaptkit.training.warmstart`.
        log_to: experiment trackers to log the run to, ``tensorboard`` and/or ``mlflow`` (see
            :mod:`adaptkit.training.tracking`); the version's ``train_info["tracking"]`` records each run.
        log_dir: where the trackers write (default: TensorBoard ``runs/``, MLflow its own default).
        image_column, label_column: the columns of a Hugging Face data set (``hf:``, ``hf-disk:``, ``hf-files:``)
            where they cannot be found from its features; recorded with the version.
        data_roots: read no data outside these folders (a server's, such as the web page's data roots): only
            ``folder:``, ``hf-disk:`` and ``hf-files:`` data sets inside them, every file they name checked.
    """
    check_train_args(dataset, task, config, TrainConfig, pretrained=pretrained, classes=classes,
                     init_from=init_from)
    task = task or _task_name(dataset, classes)
    if not TASK_NAME.match(task):
        raise ConfigError(f"bad task name {task!r}: use letters, digits, '_', '-', '.', up to 64 characters "
                          f"(pass {param('task')})")
    chosen = get_method(method, method_config)  # validates the method's settings before anything slow
    check_trackers(log_to)
    if not isinstance(backbone, BackboneSpec | Backbone):  # a name (create_backbone says what a name must be)
        backbone = BackboneSpec(backbone, weights=weights, pretrained=pretrained)
    elif weights is not None or not pretrained:
        raise ConfigError(f"{param('weights')} and {param('pretrained')} go with a backbone name; a BackboneSpec or "
                          "Backbone carries its own weights")
    given = config or TrainConfig()
    rank, world = _distributed(given.device)
    device = _device(given.device, rank, world)
    registry = registry if isinstance(registry, Registry) else Registry(registry)
    if isinstance(backbone, BackboneSpec):
        backbone = backbone.build(device)
    backbone.model.to(device)
    data, cfg = _task_data(dataset, task, backbone, given.resolved(chosen.name), registry, rank, data_dir=data_dir,
                           download=download, classes=classes, image_column=image_column, label_column=label_column,
                           data_roots=None if data_roots is None else resolve_roots(data_roots))
    warm = warmstart.choose(init_from, registry=registry, backbone=backbone, method=chosen,
                            data=data) if init_from else None
    trackers = open_trackers(log_to if rank == 0 else None, run_name=task, log_dir=log_dir)
    if trackers:
        trackers.params({"task": task, "dataset": dataset, "backbone": backbone.name, "method": chosen.name,
                         "method_config": chosen.config_dict(), **asdict(cfg)})
        on_event = _both(on_event, trackers.event)
    with torch_threads(cfg.threads or default_threads()) as threads:
        seed_everything(cfg.seed)
        model = chosen.attach(backbone.model, len(data.classes))
        try:
            if warm is not None:
                warmstart.apply(model, warm, data.classes)
            result = fit(model, data, cfg, device=device, world=world, on_event=on_event)
            version = None
            if rank == 0:
                (on_event or (lambda e: None))(TrainEvent("save", cfg.epochs, cfg.epochs, 0, 1))
                recipe = _recipe(given, result.config, device, threads, result.search)
                version = _register(registry, task, dataset, backbone, model, data, result, recipe, device,
                                    world, classes=classes, columns=(image_column, label_column), warm=warm,
                                    trackers=trackers)
            return TrainResult(version=version, metrics=result.metrics, history=result.history, model=model,
                               init_from=warm.record() if warm is not None else None)
        except BaseException:
            trackers.fail()
            raise
        finally:
            if chosen.name != "full":
                model.detach_from_trunk()  # the shared backbone leaves exactly as it came


def _task_data(dataset: str, task: str, backbone: Backbone, cfg: TrainConfig, registry: Registry, rank: int, *,
               data_dir: str | None, download: bool, classes: str | list[str] | None, image_column: str | None,
               label_column: str | None, data_roots: list[Path] | None) -> tuple[Any, TrainConfig]:
    """The task's data, checked against its classes and the registry, and the recipe with its batch fitted to it."""
    data = load_task_data(dataset, backbone.data_config, data_dir=data_dir, download=download and rank == 0,
                          val_fraction=cfg.val_fraction, seed=cfg.seed, augment=cfg.augment,
                          limit_train=cfg.limit_train, limit_eval=cfg.limit_eval, crop_scale=cfg.crop_scale,
                          flip=cfg.flip, classes=classes, image_column=image_column, label_column=label_column,
                          data_roots=data_roots)
    if len(data.train) < len(data.classes):
        raise DatasetError(f"{len(data.train)} training image(s) for {len(data.classes)} classes: every class needs "
                           f"some, so raise {param('limit_train')} (or leave it out) or train on fewer "
                           f"{param('classes')}")
    registry.check_classes(task, data.classes)
    return data, fit_batch(cfg, len(data.train))


def _register(registry: Registry, task: str, dataset: str, backbone: Backbone, model: Any, data: Any,
              result: FitResult, recipe: dict[str, Any], device: torch.device, world: int, *,
              classes: str | list[str] | None, columns: tuple[str | None, str | None], warm: Any,
              trackers: Trackers) -> VersionRow:
    """Record the trained model as the task's next version: its file (adapter, head, routing statistics) and row."""
    meta = AdapterMeta(task=task, classes=data.classes, method=model.method.name,
                       method_config=model.method.config_dict(), backbone=backbone.name,
                       backbone_weights=backbone.weights, backbone_fingerprint=backbone.fingerprint,
                       backbone_params=backbone.num_params, backbone_dim=backbone.embed_dim,
                       data_config=backbone.data_config, dataset=dataset, metrics=result.metrics, recipe=recipe)
    stats = _routing_stats(backbone, data, result.features, result.net, result.config, device)
    info: dict[str, Any] = {**result.timing, "recipe": recipe, "world_size": world, "train_images": len(data.train)}
    if data_parallel(world):
        info["ddp_backend"] = str(dist.get_backend())
    if classes:
        info["classes"] = classes if isinstance(classes, str) else ",".join(classes)
    info.update({k: v for k, v in zip(("image_column", "label_column"), columns, strict=True) if v})
    if warm is not None:
        info["init_from"] = warm.record()
    if trackers:
        info["tracking"] = trackers.record()
    version = registry.add_version(meta, {**model.state(), **stats.to_tensors()}, train_info=info)
    if trackers:
        _finish_tracking(trackers, registry, version, recipe, result.metrics)
    return version


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


def _recipe(given: TrainConfig, used: TrainConfig, device: torch.device, threads: int,
            search: LrSearch | None) -> dict[str, Any]:
    """The recipe as it ran, with the learning rate as given (None: the method's default, or "auto")."""
    recipe = {k: v for k, v in asdict(used).items() if k not in ("device", "num_workers")}
    recipe.update(lr_given=given.lr, device=device.type, threads=threads)
    if search is not None:
        recipe["lr_search"] = search.to_dict()
    return recipe


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
    from adaptkit.inference import Predictor

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

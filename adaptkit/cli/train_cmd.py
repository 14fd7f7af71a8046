"""`adaptkit train`: train a task on the frozen backbone and register it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from adaptkit.cli.common import AdaptersOpt, DeviceOpt, RegistryOpt, app, count, echo, err, friendly, plain, registry_of
from adaptkit.cli.config_file import load_config
from adaptkit.cli.progress import train_progress
from adaptkit.compare import format_bytes, format_percent
from adaptkit.errors import ConfigError
from adaptkit.settings import help_of
from adaptkit.training.config import METHOD_DEFAULTS, TrainConfig  # the recipe's settings, declared once (no torch)

METHOD_HELP = ", ".join(METHOD_DEFAULTS)


def recipe(name: str, *flags: str, **kwargs: Any) -> Any:
    """The option for the recipe's setting ``name``: its help from :class:`TrainConfig` (its default too, given as
    the parameter's default)."""
    return typer.Option(*flags, help=help_of(TrainConfig, name), **kwargs)



@app.command()
@friendly
def train(
    dataset: Annotated[str, typer.Option("--dataset", "-d", metavar="SPEC", help="digits, cifar100, folder:PATH ... "
                                         "(see `adaptkit datasets`)")],
    task: Annotated[str | None, typer.Option(metavar="NAME", help="Task name [default: the data set's name]")] = None,
    image_column: Annotated[str | None, typer.Option(metavar="NAME", help="Hugging Face data sets: the image "
                                                     "column [default: its one Image feature]")] = None,
    label_column: Annotated[str | None, typer.Option(metavar="NAME", help="Hugging Face data sets: the label "
                                                     "column [default: its one ClassLabel feature]")] = None,
    classes: Annotated[str | None, typer.Option(metavar="LIST", help="Only these classes: index ranges (0-9, "
                                                "0-4,7) or names (cat,dog)")] = None,
    backbone: Annotated[str, typer.Option(metavar="NAME", help="timm ViT name")] = "vit_base_patch16_224.augreg_in21k",
    weights: Annotated[Path | None, typer.Option(metavar="FILE", help="Local weights file (.safetensors/.pth) "
                                                  "instead of the hub")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="--no-pretrained: random "
                                             "backbone weights (recorded as such)")] = True,
    image_size: Annotated[int | None, typer.Option(metavar="N", help="Input size in px, a multiple of the patch "
                                                   "(position embedding resampled; the task predicts at it) "
                                                   "[default: the backbone's own]")] = None,
    method: Annotated[str, typer.Option(metavar="NAME", help=METHOD_HELP)] = "adapter",
    rank: Annotated[int | None, typer.Option(metavar="R", help="Adapter bottleneck / LoRA rank "
                                             "[default: 64 / 8]")] = None,
    placement: Annotated[str | None, typer.Option(metavar="WHERE", help="Adapter placement: parallel, "
                                                  "sequential, houlsby, adapterplus")] = None,
    scale: Annotated[float | None, typer.Option(metavar="S", help="Adapter output scale")] = None,
    alpha: Annotated[float | None, typer.Option(metavar="A", help="LoRA alpha")] = None,
    targets: Annotated[str | None, typer.Option(metavar="LAYERS", help="LoRA targets, comma-separated: "
                                                "qkv,proj,fc1,fc2")] = None,
    tokens: Annotated[int | None, typer.Option(metavar="N", help="VPT prompt tokens [default: 10]")] = None,
    prompt_mode: Annotated[str | None, typer.Option(metavar="MODE", help="VPT prompts: deep (every block) or "
                                                    "shallow (input only) [default: deep]")] = None,
    prompt_init: Annotated[str | None, typer.Option(metavar="INIT", help="VPT prompt init: xavier or normal "
                                                    "[default: xavier]")] = None,
    blocks: Annotated[int | None, typer.Option(metavar="K", help="Put the method's modules only in the last K "
                                               "blocks (full: train only them) [default: every block]")] = None,
    init_from: Annotated[str | None, typer.Option(metavar="TASK", help="Start from a registered adapter: TASK, "
                                                  "TASK@N, or auto (the task whose data look closest)")] = None,
    checkpointing: Annotated[bool, recipe("checkpointing", "--checkpointing/--no-checkpointing")
                             ] = TrainConfig.checkpointing,
    feature_cache: Annotated[bool, recipe("feature_cache", "--feature-cache/--no-feature-cache")
                             ] = TrainConfig.feature_cache,
    epochs: Annotated[int, recipe("epochs", metavar="N")] = TrainConfig.epochs,
    batch_size: Annotated[int, recipe("batch_size", metavar="N")] = TrainConfig.batch_size,
    lr: Annotated[str | None, recipe("lr", metavar="RATE|auto")] = TrainConfig.lr,
    weight_decay: Annotated[float | None, recipe("weight_decay", metavar="WD")] = TrainConfig.weight_decay,
    warmup_epochs: Annotated[float, recipe("warmup_epochs", metavar="N")] = TrainConfig.warmup_epochs,
    label_smoothing: Annotated[float, recipe("label_smoothing", metavar="X")] = TrainConfig.label_smoothing,
    augment: Annotated[str, recipe("augment", metavar="LEVEL")] = TrainConfig.augment,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Same as --augment none")] = False,
    flip: Annotated[bool, recipe("flip", "--flip/--no-flip")] = TrainConfig.flip,
    threads: Annotated[int | None, recipe("threads", metavar="N")] = TrainConfig.threads,
    seed: Annotated[int, recipe("seed", metavar="N")] = TrainConfig.seed,
    device: DeviceOpt = None,
    precision: Annotated[str, recipe("precision", metavar="P")] = TrainConfig.precision,
    limit_train: Annotated[int | None, recipe("limit_train", metavar="N")] = TrainConfig.limit_train,
    limit_eval: Annotated[int | None, recipe("limit_eval", metavar="N")] = TrainConfig.limit_eval,
    num_workers: Annotated[int | None, recipe("num_workers", metavar="N")] = TrainConfig.num_workers,
    data_dir: Annotated[Path | None, typer.Option(metavar="DIR", help="Where torchvision data sets "
                                                  "live")] = None,
    download: Annotated[bool, typer.Option("--download/--no-download", help="Download a missing "
                                           "torchvision set")] = True,
    log_to: Annotated[list[str] | None, typer.Option("--log-to", metavar="TRACKER", help="Log the run to "
                                                     "tensorboard or mlflow (repeat for both; needs "
                                                     "adaptkit[tracking])", show_default=False)] = None,
    log_dir: Annotated[Path | None, typer.Option(metavar="DIR", help="Where the trackers write [default: "
                                                 "runs/ for TensorBoard, $MLFLOW_TRACKING_URI or MLflow's "
                                                 "default]")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", metavar="FILE", is_eager=True,
                                                     callback=load_config, help="A YAML recipe: train's options "
                                                     "as keys (`adaptkit show TASK --recipe` writes one); "
                                                     "options given here win")] = None,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
) -> None:
    """Train a task and register it as a new version.

    Only the adapter and the head train; the backbone stays frozen and shared by every task.
    """
    from adaptkit.backbone import BackboneSpec
    from adaptkit.training import train as run

    method_config = _method_config(method, rank=rank, placement=placement, scale=scale, alpha=alpha,
                                   targets=targets, tokens=tokens, prompt_mode=prompt_mode, prompt_init=prompt_init,
                                   blocks=blocks)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=_lr(lr), weight_decay=weight_decay,
                         warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
                         augment=_augment(augment, no_augment), flip=flip, threads=threads, seed=seed,
                         device=device,
                         precision=precision, limit_train=limit_train, limit_eval=limit_eval,
                         num_workers=num_workers, checkpointing=checkpointing, feature_cache=feature_cache)
    with train_progress(err, plain()) as on_event:
        spec = BackboneSpec(backbone, weights=str(weights) if weights else None, pretrained=pretrained,
                            image_size=image_size)
        result = run(dataset, task=task, backbone=spec, method=method, method_config=method_config, config=config,
                     registry=registry_of(registry, adapters), data_dir=str(data_dir) if data_dir else None,
                     download=download, on_event=on_event, classes=classes, init_from=init_from,
                     log_to=log_to or None, log_dir=log_dir, image_column=image_column,
                     label_column=label_column)
    v, m = result.version, result.metrics
    if v is None:  # a worker process under torchrun: rank 0 records and reports
        return
    echo(f"trained [bold]{v.ref}[/bold]: test top-1 {format_percent(m['test_top1'])}, "
         f"top-5 {format_percent(m['test_top5'])}, best epoch {m['best_epoch']}, {v.train_time_s:.0f} s")
    echo(f"  {v.method}, {count(v.trainable_params)} trainable parameters, {format_bytes(v.bytes)} file")
    if result.init_from:
        echo(escape(_warm_line(result.init_from)))
    for line in tracking_lines(v.train.get("tracking") or {}):
        echo(escape(line))


def tracking_lines(tracking: dict[str, Any]) -> list[str]:
    """Where a version's training was logged: one line per tracker."""
    lines = []
    if "tensorboard" in tracking:
        lines.append(f"  tensorboard: {tracking['tensorboard']['log_dir']}")
    if "mlflow" in tracking:
        run = tracking["mlflow"]
        lines.append(f"  mlflow: run {run['run_id']} in experiment {run['experiment']} at {run['tracking_uri']}")
    return lines


# method -> {CLI option (parameter name): the method's setting}
METHOD_OPTIONS: dict[str, dict[str, str]] = {
    "adapter": {"rank": "rank", "placement": "placement", "scale": "scale"},
    "lora": {"rank": "rank", "alpha": "alpha", "targets": "targets"},
    "vpt": {"tokens": "tokens", "prompt_mode": "mode", "prompt_init": "init"},
}


def _lr(value: str | None) -> float | str | None:
    """``--lr``: a number, ``auto``, or nothing for the method's default."""
    if value is None or value.strip().lower() == "auto":
        return value and "auto"
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"bad --lr {value!r}: give a number such as 3e-3, or auto") from None


def _augment(level: str, no_augment: bool) -> str:
    if no_augment and level.strip().lower() not in ("none", "light"):
        raise ConfigError(f"--no-augment contradicts --augment {level}: give one of them")
    return "none" if no_augment else level


def _method_config(method: str, **given: Any) -> dict[str, Any]:
    """Map CLI options onto the method's settings; an option that the method does not take is an error."""
    method = method.strip().lower()
    takes = {**METHOD_OPTIONS.get(method, {}), "blocks": "blocks"}  # every method's; linear refuses it itself
    config = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in takes:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} does not apply to method {method!r}")
        config[takes[name]] = tuple(t.strip() for t in value.split(",")) if name == "targets" else value
    return config


def _warm_line(info: dict[str, Any]) -> str:
    """One line on where the task started from."""
    if info["ref"] is None:
        return f"init-from auto: {info.get('note', 'a cold start')}"
    how = f"cosine {info['similarity']:.3f} to the new data, " if info.get("auto") else ""
    return f"warm start from {info['ref']} ({how}head {info['head']})"

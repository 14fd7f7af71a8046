"""`adaptkit train`: train a task on the frozen backbone and register it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from adaptkit.cli.common import RegistryOpt, app, count, err, friendly, out, registry_of
from adaptkit.compare import format_bytes, format_percent
from adaptkit.errors import ConfigError


class _RichProgress:
    """Feeds the library's TrainEvents into a rich progress bar."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.bar = progress.add_task("starting", total=None, stats="")

    def __call__(self, e: Any) -> None:
        stats = []
        if e.loss is not None:
            stats.append(f"loss {e.loss:.3f}")
        if e.accuracy is not None:
            stats.append(f"acc {100 * e.accuracy:.1f}%")
        if e.images_per_s:
            stats.append(f"{e.images_per_s:.0f} img/s")
        if e.phase == "lr":
            self.progress.console.print(f"--lr auto chose {e.lr:.2g} (validation top-1 {100 * e.accuracy:.1f}%)")
            return
        label = {"search": f"lr {e.lr or 0:.2g} {e.epoch}/{e.epochs}", "train": f"epoch {e.epoch}/{e.epochs}",
                 "val": f"validate {e.epoch}/{e.epochs}", "test": "test", "save": "saving"}[e.phase]
        self.progress.update(self.bar, description=label, completed=e.step, total=e.steps, stats="  ".join(stats))


@app.command()
@friendly
def train(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="cifar100, folder:PATH, digits ... "
                                         "(see `adaptkit datasets`)")],
    task: Annotated[str | None, typer.Option(help="Task name [default: the data set's name]")] = None,
    backbone: Annotated[str, typer.Option(help="timm ViT name")] = "vit_base_patch16_224.augreg_in21k",
    weights: Annotated[Path | None, typer.Option(help="Local weights file (.safetensors/.pth) instead of the "
                                                  "hub")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="--no-pretrained: random "
                                             "backbone weights (recorded as such)")] = True,
    method: Annotated[str, typer.Option(help="adapter, lora, linear or full")] = "adapter",
    rank: Annotated[int | None, typer.Option(help="Adapter bottleneck / LoRA rank [default: 64 / 8]")] = None,
    placement: Annotated[str | None, typer.Option(help="Adapter placement: parallel, sequential, "
                                                  "houlsby")] = None,
    scale: Annotated[float | None, typer.Option(help="Adapter output scale")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha")] = None,
    targets: Annotated[str | None, typer.Option(help="LoRA targets, comma-separated: qkv,proj,fc1,fc2")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[str | None, typer.Option(metavar="RATE|auto", help="Peak learning rate, or auto: a short "
                                           "sweep on the validation split [default: the method's base rate x "
                                           "batch/256]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="[default: the method's]")] = None,
    warmup_epochs: Annotated[float, typer.Option(min=0)] = 1.0,
    label_smoothing: Annotated[float, typer.Option(min=0, max=0.99)] = 0.1,
    augment: Annotated[str, typer.Option(metavar="LEVEL", help="none, light (random crops of 60-100%) or strong "
                                         "(8-100% and colour jitter)")] = "light",
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Same as --augment none")] = False,
    flip: Annotated[bool, typer.Option("--flip", help="Random horizontal flips (wrong for text, digits "
                                       "...)")] = False,
    threads: Annotated[int | None, typer.Option(min=1, metavar="N", help="CPU threads [default: the idle cores, "
                                                "1-4]")] = None,
    seed: int = 0,
    device: Annotated[str | None, typer.Option(help="cuda, cpu ... [default: cuda if available]")] = None,
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA), bf16 or fp32")] = "auto",
    limit_train: Annotated[int | None, typer.Option(min=1, help="Use only N training images")] = None,
    limit_eval: Annotated[int | None, typer.Option(min=1, help="Use only N val and N test images")] = None,
    num_workers: Annotated[int | None, typer.Option(min=0, help="Data loader workers")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where torchvision data sets live")] = None,
    download: Annotated[bool, typer.Option("--download/--no-download", help="Download a missing "
                                           "torchvision set")] = True,
    registry: RegistryOpt = None,
) -> None:
    """Train a task on the frozen backbone and add it to the registry as a new version."""
    from adaptkit.train import TrainConfig
    from adaptkit.train import train as run

    method_config = _method_config(method, rank=rank, placement=placement, scale=scale, alpha=alpha,
                                   targets=targets)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=_lr(lr), weight_decay=weight_decay,
                         warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
                         augment=_augment(augment, no_augment), flip=flip, threads=threads, seed=seed,
                         device=device,
                         precision=precision, limit_train=limit_train, limit_eval=limit_eval,
                         num_workers=num_workers)
    columns = [TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        result = run(dataset, task=task, backbone=backbone, weights=str(weights) if weights else None,
                     pretrained=pretrained, method=method, method_config=method_config, config=config,
                     registry=registry_of(registry), data_dir=str(data_dir) if data_dir else None, download=download,
                     on_event=_RichProgress(progress))
    v, m = result.version, result.metrics
    if v is None:  # a worker process under torchrun: rank 0 records and reports
        return
    out.print(f"trained [bold]{v.ref}[/bold] ({v.method}, {count(v.trainable_params)} trainable parameters, "
              f"{format_bytes(v.bytes)}): test top-1 {format_percent(m['test_top1'])}, "
              f"top-5 {format_percent(m['test_top5'])}, "
              f"best epoch {m['best_epoch']}, {v.train_time_s:.0f} s")


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
    takes = {"adapter": {"rank", "placement", "scale"}, "lora": {"rank", "alpha", "targets"}}.get(method, set())
    config = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in takes:
            raise ConfigError(f"--{name} does not apply to method {method!r}")
        config[name] = tuple(t.strip() for t in value.split(",")) if name == "targets" else value
    return config

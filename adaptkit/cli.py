"""The ``adaptkit`` command line: a thin layer that parses, calls the library and prints.

Every :class:`~adaptkit.errors.AdaptkitError` becomes a one-line message on stderr and exit status 1.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from adaptkit.compare import format_bytes, format_percent
from adaptkit.errors import AdaptkitError, ConfigError

app = typer.Typer(help="Adapt one frozen Vision Transformer to many image tasks.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

RegistryOpt = Annotated[str | None, typer.Option("--registry", "-r", help="Registry path or SQLAlchemy URL "
                                                 "[default: $ADAPTKIT_REGISTRY or ./registry.db]")]


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line and exit 1; Ctrl-C into exit 130 with nothing saved."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AdaptkitError as exc:
            err.print(f"[red]error:[/red] {exc}", markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted: nothing was written to the registry")
            raise typer.Exit(130) from None

    return wrapper


def _registry(url: str | None):
    from adaptkit.registry import Registry

    return Registry(url)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


# -- train -------------------------------------------------------------------------------------------------------


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
        label = {"train": f"epoch {e.epoch}/{e.epochs}", "val": f"validate {e.epoch}/{e.epochs}",
                 "test": "test", "save": "saving"}[e.phase]
        self.progress.update(self.bar, description=label, completed=e.step, total=e.steps, stats="  ".join(stats))


@app.command()
@_friendly
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
    lr: Annotated[float | None, typer.Option(help="Peak learning rate [default: the method's]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="[default: the method's]")] = None,
    warmup_epochs: Annotated[float, typer.Option(min=0)] = 1.0,
    label_smoothing: Annotated[float, typer.Option(min=0, max=0.99)] = 0.1,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random resized crop and flip while "
                                          "training")] = True,
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
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, augment=augment, seed=seed,
                         device=device,
                         precision=precision, limit_train=limit_train, limit_eval=limit_eval,
                         num_workers=num_workers)
    columns = [TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        result = run(dataset, task=task, backbone=backbone, weights=str(weights) if weights else None,
                     pretrained=pretrained, method=method, method_config=method_config, config=config,
                     registry=_registry(registry), data_dir=str(data_dir) if data_dir else None, download=download,
                     on_event=_RichProgress(progress))
    v, m = result.version, result.metrics
    if v is None:  # a worker process under torchrun: rank 0 records and reports
        return
    out.print(f"trained [bold]{v.ref}[/bold] ({v.method}, {_count(v.trainable_params)} trainable parameters, "
              f"{format_bytes(v.bytes)}): test top-1 {format_percent(m['test_top1'])}, "
              f"top-5 {format_percent(m['test_top5'])}, "
              f"best epoch {m['best_epoch']}, {v.train_time_s:.0f} s")


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


def _config_text(config: dict[str, Any]) -> str:
    """``rank=64 placement=parallel``: the settings that say what the method is, without the defaults' noise."""
    quiet = {"dropout": 0.0, "act": "gelu"}
    return " ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in config.items()
                    if quiet.get(k, object()) != v) or "-"


# -- inspecting --------------------------------------------------------------------------------------------------


@app.command("list")
@_friendly
def list_tasks(registry: RegistryOpt = None) -> None:
    """List the registered tasks and their default versions."""
    reg = _registry(registry)
    tasks = reg.tasks()
    if not tasks:
        out.print(f"no tasks in {reg.url} yet. Train one: adaptkit train --dataset digits "
                  "--backbone vit_cifar_tiny_patch4_32.adaptkit_c10")
        return
    table = Table("task", "default", "versions", "method", "backbone", "trainable", "size", "test top-1",
                  "dataset", title=f"tasks in {reg.url}")
    for t in tasks:
        d = t.default
        table.add_row(t.name, f"v{d.version}", str(len(t.versions)), d.method, d.backbone.name,
                      _count(d.trainable_params), format_bytes(d.bytes), format_percent(d.metrics.get("test_top1")),
                      t.dataset)
    out.print(table)


@app.command()
@_friendly
def show(ref: Annotated[str, typer.Argument(help="TASK or TASK@VERSION")], registry: RegistryOpt = None) -> None:
    """Show a task's versions and the details of one version."""
    reg = _registry(registry)
    v = reg.get_version(ref)
    t = next(t for t in reg.tasks() if t.name == v.task.name)
    out.print(f"[bold]{t.name}[/bold]: {len(t.classes)} classes from {t.dataset}: {', '.join(t.classes[:10])}"
              f"{' ...' if len(t.classes) > 10 else ''}")
    table = Table("version", "default", "method", "config", "trainable", "size", "test top-1", "time", "device")
    for x in t.versions:
        table.add_row(f"v{x.version}", "*" if x.is_default else "", x.method, _config_text(x.config),
                      _count(x.trainable_params), format_bytes(x.bytes), format_percent(x.metrics.get("test_top1")),
                      f"{x.train_time_s:.0f} s" if x.train_time_s else "-", x.device or "-")
    out.print(table)
    b = v.backbone
    out.print(f"v{v.version}: backbone {b.name} ({b.weights}), fingerprint {b.fingerprint[:16]}\n"
              f"file {reg.path_of(v)} sha256 {v.sha256[:16]}\nmetrics {json.dumps(v.metrics)}")


@app.command("eval")
@_friendly
def eval_task(
    ref: Annotated[str, typer.Argument(help="TASK or TASK@VERSION")],
    dataset: Annotated[str | None, typer.Option(help="Another data set with the same classes")] = None,
    split: Annotated[str, typer.Option(help="test or val")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="Use only N images")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    device: str | None = None,
    data_dir: Annotated[Path | None, typer.Option()] = None,
    registry: RegistryOpt = None,
) -> None:
    """Measure a version's accuracy on its data set's test split."""
    from adaptkit.train import evaluate

    m = evaluate(ref, registry=_registry(registry), dataset=dataset, split=split, batch_size=batch_size,
                 device=device, data_dir=str(data_dir) if data_dir else None, limit=limit)
    out.print(f"{ref}: top-1 {format_percent(m['top1'])}, top-5 {format_percent(m['top5'])}, loss {m['loss']:.4f} "
              f"on {m['images']} {split} images")


@app.command()
@_friendly
def predict(
    ref: Annotated[str, typer.Argument(help="TASK or TASK@VERSION")],
    images: Annotated[list[Path], typer.Argument(help="Image files")],
    topk: Annotated[int, typer.Option(min=1)] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    device: str | None = None,
    registry: RegistryOpt = None,
) -> None:
    """Predict the top-k labels of images with one task."""
    from adaptkit.predict import Predictor

    results = Predictor(_registry(registry), device=device).predict(list(images), ref, topk=topk)
    if as_json:
        out.print_json(data=[{"image": str(p), "predictions": [asdict(x) for x in r]}
                             for p, r in zip(images, results, strict=True)])
        return
    for path, preds in zip(images, results, strict=True):
        out.print(f"{path}: " + ", ".join(f"{p.label} {100 * p.prob:.1f}%" for p in preds))


@app.command()
@_friendly
def compare(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Parameters, storage, accuracy and time of every task against full fine-tuning."""
    from adaptkit.compare import compare as costs

    report = costs(_registry(registry))
    if as_json:
        out.print_json(data=report.to_dict())
        return
    if as_csv:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(asdict(report.rows[0])) if report.rows else ["task"])
        writer.writeheader()
        writer.writerows(asdict(r) for r in report.rows)
        sys.stdout.write(buf.getvalue())
        return
    if not report.rows:
        out.print("no tasks yet: train one with `adaptkit train --dataset ...`")
        return
    table = Table("task", "method", "trainable", "of backbone", "size", "test top-1", "train time", "peak mem",
                  "full: params", "full: size", "full: top-1", title="adapters against full fine-tuning")
    for r in report.rows:
        table.add_row(f"{r.task}@{r.version}{' *' if r.default else ''}", r.method, _count(r.trainable_params),
                      f"{100 * r.share_of_backbone:.2f}%", format_bytes(r.bytes), format_percent(r.test_top1),
                      f"{r.train_time_s:.0f} s" if r.train_time_s else "-",
                      f"{r.peak_memory_mb:.0f} MB" if r.peak_memory_mb else "-", _count(r.full_params),
                      format_bytes(r.full_bytes) + ("" if r.full_measured else " (computed)"),
                      format_percent(r.full_test_top1) if r.full_measured else "-")
    out.print(table)
    out.print(f"{report.tasks} task(s): {report.backbones} backbone(s) {format_bytes(report.backbone_bytes)} "
              f"+ adapters {format_bytes(report.adapters_bytes)} = [bold]{format_bytes(report.shared_total_bytes)}"
              f"[/bold], against "
              f"{report.tasks} full copies = [bold]{format_bytes(report.full_total_bytes)}[/bold]: full fine-tuning "
              f"needs {report.saving:.1f}x the storage")


# -- changing the registry ---------------------------------------------------------------------------------------


@app.command()
@_friendly
def remove(
    ref: Annotated[str, typer.Argument(help="TASK (every version) or TASK@VERSION")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Remove a task or one of its versions, with its adapter file."""
    reg = _registry(registry)
    reg.get_version(ref)
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"removing {ref} deletes its adapter file(s): pass --yes to confirm")
        typer.confirm(f"remove {ref} and its adapter file(s)?", abort=True)
    removed = reg.remove(ref)
    out.print(f"removed {', '.join(removed)}")


@app.command()
@_friendly
def default(ref: Annotated[str, typer.Argument(help="TASK@VERSION")], registry: RegistryOpt = None) -> None:
    """Make a version its task's default."""
    v = _registry(registry).set_default(ref)
    out.print(f"{v.ref} is now the default of {v.task.name}")


@app.command()
@_friendly
def export(
    ref: Annotated[str, typer.Argument(help="TASK or TASK@VERSION")],
    file: Annotated[Path, typer.Argument(help="Destination .safetensors file or folder")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Write a version's self-describing adapter file, to share or import elsewhere."""
    dest = _registry(registry).export(ref, file, overwrite=force)
    out.print(f"exported {ref} to {dest}")


@app.command("import")
@_friendly
def import_file(
    file: Annotated[Path, typer.Argument(help="An exported adapter .safetensors file")],
    task: Annotated[str | None, typer.Option(help="Register under this task name [default: the file's]")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Add an exported adapter file to this registry as a new version."""
    v = _registry(registry).import_file(file, task=task)
    out.print(f"imported {file} as {v.ref}")


@app.command()
@_friendly
def datasets() -> None:
    """List the data sets `train --dataset` accepts."""
    from adaptkit.data import list_datasets

    table = Table("name", "kind", "classes", "description")
    for d in list_datasets():
        table.add_row(d.name, d.kind, str(d.num_classes or "-"), d.description)
    out.print(table)


@app.command()
@_friendly
def ui(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port [default: Gradio's, 7860]")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Start the web page: upload an image, switch tasks, compare costs, add a task."""
    from adaptkit_app.main import launch

    launch(registry=registry, host=host, port=port)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what adaptkit does")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


if __name__ == "__main__":
    app()

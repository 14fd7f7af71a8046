"""Commands that read the registry: `list`, `show`, `compare`, `datasets`."""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.table import Table

from adaptkit.cli.common import RegistryOpt, app, count, friendly, out, registry_of
from adaptkit.compare import format_bytes, format_percent
from adaptkit.recipe import describe_recipe


def _config_text(config: dict[str, Any]) -> str:
    """``rank=64 placement=parallel``: the settings that say what the method is, without the defaults' noise."""
    quiet = {"dropout": 0.0, "act": "gelu"}
    return " ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in config.items()
                    if quiet.get(k, object()) != v) or "-"


@app.command("list")
@friendly
def list_tasks(registry: RegistryOpt = None) -> None:
    """List the registered tasks and their default versions."""
    reg = registry_of(registry)
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
                      count(d.trainable_params), format_bytes(d.bytes), format_percent(d.metrics.get("test_top1")),
                      t.dataset)
    out.print(table)


@app.command()
@friendly
def show(ref: Annotated[str, typer.Argument(help="TASK or TASK@VERSION")], registry: RegistryOpt = None) -> None:
    """Show a task's versions and the details of one version."""
    reg = registry_of(registry)
    v = reg.get_version(ref)
    t = next(t for t in reg.tasks() if t.name == v.task.name)
    out.print(f"[bold]{t.name}[/bold]: {len(t.classes)} classes from {t.dataset}: {', '.join(t.classes[:10])}"
              f"{' ...' if len(t.classes) > 10 else ''}")
    table = Table("version", "default", "method", "config", "trainable", "size", "test top-1", "time", "device")
    for x in t.versions:
        table.add_row(f"v{x.version}", "*" if x.is_default else "", x.method, _config_text(x.config),
                      count(x.trainable_params), format_bytes(x.bytes), format_percent(x.metrics.get("test_top1")),
                      f"{x.train_time_s:.0f} s" if x.train_time_s else "-", x.device or "-")
    out.print(table)
    b = v.backbone
    out.print(f"v{v.version}: backbone {b.name} ({b.weights}), fingerprint {b.fingerprint[:16]}\n"
              f"file {reg.path_of(v)} sha256 {v.sha256[:16]}\nmetrics {json.dumps(v.metrics)}")
    out.print(f"recipe {describe_recipe(v.train)}", highlight=False)


@app.command()
@friendly
def compare(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Parameters, storage, accuracy and time of every task against full fine-tuning."""
    from adaptkit.compare import compare as costs

    report = costs(registry_of(registry))
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
        table.add_row(f"{r.task}@{r.version}{' *' if r.default else ''}", r.method, count(r.trainable_params),
                      f"{100 * r.share_of_backbone:.2f}%", format_bytes(r.bytes), format_percent(r.test_top1),
                      f"{r.train_time_s:.0f} s" if r.train_time_s else "-",
                      f"{r.peak_memory_mb:.0f} MB" if r.peak_memory_mb else "-", count(r.full_params),
                      format_bytes(r.full_bytes) + ("" if r.full_measured else " (computed)"),
                      format_percent(r.full_test_top1) if r.full_measured else "-")
    out.print(table)
    out.print(f"{report.tasks} task(s): {report.backbones} backbone(s) {format_bytes(report.backbone_bytes)} "
              f"+ adapters {format_bytes(report.adapters_bytes)} = [bold]{format_bytes(report.shared_total_bytes)}"
              f"[/bold], against "
              f"{report.tasks} full copies = [bold]{format_bytes(report.full_total_bytes)}[/bold]: full fine-tuning "
              f"needs {report.saving:.1f}x the storage")


@app.command()
@friendly
def datasets() -> None:
    """List the data sets `train --dataset` accepts."""
    from adaptkit.data import list_datasets

    table = Table("name", "kind", "classes", "description")
    for d in list_datasets():
        table.add_row(d.name, d.kind, str(d.num_classes or "-"), d.description)
    out.print(table)

"""Commands that read the registry: `list`, `show`, `compare`, `datasets`."""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.markup import escape

from adaptkit.cli.common import AdaptersOpt, RefArg, RegistryOpt, app, count, echo, friendly, out, registry_of
from adaptkit.cli.tables import Col, print_table
from adaptkit.compare import format_bytes, format_percent
from adaptkit.training.recipe import describe_recipe


def _config_text(config: dict[str, Any]) -> str:
    """``rank=64 placement=parallel``: the settings that say what the method is, without the defaults' noise."""
    quiet = {"dropout": 0.0, "act": "gelu"}
    return " ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in config.items()
                    if quiet.get(k, object()) != v) or "-"


@app.command("list")
@friendly
def list_tasks(registry: RegistryOpt = None, adapters: AdaptersOpt = None) -> None:
    """List the registered tasks and their default versions."""
    from adaptkit.sizes import sized_name

    reg = registry_of(registry, adapters)
    tasks = reg.tasks()
    if not tasks:
        where = f"tasks in {reg.location}" if reg.exists else f"registry at {reg.location}"
        echo(f"no {where} yet. Train one: adaptkit train --dataset digits "
             "--backbone vit_cifar_tiny_patch4_32.adaptkit_c10")
        return
    cols = [Col("task", whole=True), Col("default"), Col("versions", True, drop=3), Col("method"),
            Col("backbone", drop=5), Col("trainable", True, drop=2), Col("size", True, drop=1), Col("test top-1", True),
            Col("dataset", drop=4)]
    rows, broken = [], []
    for t in tasks:
        d = t.default
        if t.broken:  # a bad row is shown, never fatal
            broken.append(f"{t.name}: {t.broken}")
            rows.append([str(t.name), "-", str(len(t.versions)), "broken", *["-"] * 5])
            continue
        rows.append([t.name, f"v{d.version}", str(len(t.versions)), d.method,
                     sized_name(d.backbone.name, d.backbone.data_config, " " if out.is_terminal else ""),
                     count(d.trainable_params),
                     format_bytes(d.bytes), format_percent(d.metrics.get("test_top1")), t.dataset])
    print_table(out, cols, rows, title=f"tasks in {reg.location}")
    for line in broken:
        echo(escape(f"broken {line}: run `adaptkit doctor`"))


@app.command()
@friendly
def show(ref: RefArg, recipe: Annotated[bool, typer.Option("--recipe", help="Print only a YAML recipe that "
                                                           "trains this version again (`adaptkit train "
                                                           "--config FILE`)")] = False,
         registry: RegistryOpt = None, adapters: AdaptersOpt = None) -> None:
    """Show a task's versions and the details of one version."""
    reg = registry_of(registry, adapters)
    v = reg.get_version(ref)
    if recipe:
        from adaptkit.cli.config_file import recipe_yaml
        from adaptkit.cli.train_cmd import METHOD_OPTIONS

        out.file.write(recipe_yaml(v, METHOD_OPTIONS))
        return
    t = next(t for t in reg.tasks() if t.name == v.task.name)
    echo(f"[bold]{escape(t.name)}[/bold]: {len(t.classes)} classes from {escape(t.dataset)}: "
         f"{escape(', '.join(t.classes[:10]))}{' ...' if len(t.classes) > 10 else ''}")
    cols = [Col("version", whole=True), Col("method"), Col("config", drop=2), Col("trainable", True, drop=3),
            Col("size", True), Col("test top-1", True), Col("time", True, drop=4), Col("device", drop=5)]
    rows = [[f"v{x.version}{' *' if x.is_default else ''}", x.method, _config_text(x.config), count(x.trainable_params),
             format_bytes(x.bytes), format_percent(x.metrics.get("test_top1")),
             f"{x.train_time_s:.0f} s" if x.train_time_s else "-", x.device or "-"] for x in t.versions]
    print_table(out, cols, rows, title="versions (* = default)")
    b = v.backbone
    size = (b.data_config or {}).get("input_size") or ["?"]
    for line in (f"v{v.version}: backbone {b.name} ({b.weights}) at {size[-1]} px, fingerprint {b.fingerprint[:16]}",
                 f"file {reg.location_of(v)} sha256 {v.sha256[:16]}", f"metrics {json.dumps(v.metrics)}"):
        echo(escape(line))
    echo(escape(f"recipe {describe_recipe(v.train)}"))
    from adaptkit.cli.train_cmd import tracking_lines

    for line in tracking_lines(v.train.get("tracking") or {}):
        echo(escape(line.strip()))


@app.command()
@friendly
def compare(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV")] = False,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
) -> None:
    """Costs of every task against full fine-tuning.

    Trainable parameters, storage, accuracy and training time, beside what full fine-tuning needs.
    """
    from adaptkit.compare import compare as costs

    report = costs(registry_of(registry, adapters))
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
    if not report.rows and not report.broken:
        echo("no tasks yet: train one with `adaptkit train --dataset ...`")
        return
    cols = [Col("task", whole=True), Col("method"), Col("trainable", True, drop=4), Col("share", True, drop=5),
            Col("size", True), Col("top-1", True), Col("time", True, drop=7), Col("peak mem", True, drop=9),
            Col("full params", True, drop=6), Col("full size", True, drop=3), Col("full top-1", True, drop=8)]
    rows = [[f"{r.task}@{r.version}{' *' if r.default else ''}", r.method, count(r.trainable_params),
             f"{100 * r.share_of_backbone:.2f}%", format_bytes(r.bytes), format_percent(r.test_top1),
             f"{r.train_time_s:.0f} s" if r.train_time_s else "-",
             f"{r.peak_memory_mb:.0f} MB" if r.peak_memory_mb else "-", count(r.full_params),
             format_bytes(r.full_bytes), format_percent(r.full_test_top1) if r.full_measured else "-"]
            for r in report.rows]
    print_table(out, cols, rows, title="adapters against full fine-tuning: share of the backbone's parameters, "
                "test top-1, training time (* = default version)")
    for line in report.broken:
        echo(escape(f"left out, broken: {line}: run `adaptkit doctor`"))
    if not all(r.full_measured for r in report.rows):
        echo("full: computed (backbone + head in fp32) where the task has no `full` version to measure")
    echo(f"{report.tasks} task(s): {report.backbones} backbone(s) {format_bytes(report.backbone_bytes)} "
         f"+ adapters {format_bytes(report.adapters_bytes)} = [bold]{format_bytes(report.shared_total_bytes)}"
         f"[/bold], against {report.tasks} full copies = [bold]{format_bytes(report.full_total_bytes)}[/bold]: "
         f"full fine-tuning needs {report.saving:.1f}x the storage")


@app.command()
@friendly
def datasets() -> None:
    """List the data sets `train --dataset` accepts."""
    from adaptkit.data import SPEC_RULE, list_datasets

    rows = [[d.name, d.kind, str(d.num_classes or "-"), d.description] for d in list_datasets()]
    print_table(out, [Col("name", whole=True), Col("kind", drop=1), Col("classes", True), Col("description")], rows)
    echo(SPEC_RULE)

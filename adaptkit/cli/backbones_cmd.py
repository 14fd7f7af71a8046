"""`adaptkit backbones`: the pretrained backbones to pick from, by family, from timm's own configs."""

from __future__ import annotations

from typing import Annotated

import typer

from adaptkit.cli.common import app, count, echo, friendly, out
from adaptkit.cli.tables import Col, print_table


@app.command()
@friendly
def backbones(
    every: Annotated[bool, typer.Option("--all", help="Every pretrained tag of every timm ViT adaptkit adapts (the "
                                        "first run describes them all: about half a minute)")] = False,
) -> None:
    """List recommended pretrained backbones: input size, parameters, width, licence, and whether the weights are
    on this machine.

    Sizes, licences and parameter counts are timm's; nothing is downloaded. Train on one with
    `adaptkit train --backbone NAME`; `--image-size N` runs it at another input size.
    """
    from adaptkit.backbone_catalog import catalog

    entries = catalog(every=every)
    cols = [Col("family", drop=2), Col("backbone", whole=True), Col("px", True), Col("params", True),
            Col("dim", True, drop=1), Col("licence", drop=3), Col("cached")]
    rows = [[e.family, e.name + (" *" if e.default else ""), str(e.input_size), count(e.params), str(e.width),
             e.license or "-", "yes" if e.cached else "no"] for e in entries]
    print_table(out, cols, rows, title="pretrained backbones (* the default)", group=0)
    cached = sum(e.cached for e in entries)
    echo(f"{len(entries)} backbones, {cached} with weights on this machine; * is the default.")
    echo("Use one: adaptkit train --backbone NAME [--image-size N]")
    echo("Which for what: the Backbones page of the docs (docs/backbones.md)")

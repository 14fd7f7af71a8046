"""Commands that run a task: `eval` and `predict`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from adaptkit.cli.common import DeviceOpt, RefArg, RegistryOpt, app, echo, friendly, out, registry_of
from adaptkit.compare import format_percent


@app.command("eval")
@friendly
def eval_task(
    ref: RefArg,
    dataset: Annotated[str | None, typer.Option(metavar="SPEC", help="Another data set with the same "
                                                "classes")] = None,
    split: Annotated[str, typer.Option(metavar="SPLIT", help="test or val")] = "test",
    limit: Annotated[int | None, typer.Option(metavar="N", help="Use only N images")] = None,
    batch_size: Annotated[int, typer.Option(metavar="N", help="Images per batch")] = 128,
    device: DeviceOpt = None,
    data_dir: Annotated[Path | None, typer.Option(metavar="DIR", help="Where torchvision data sets live")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Measure a version's accuracy on its data set's test split."""
    from adaptkit.train import evaluate

    m = evaluate(ref, registry=registry_of(registry), dataset=dataset, split=split, batch_size=batch_size,
                 device=device, data_dir=str(data_dir) if data_dir else None, limit=limit)
    echo(f"{ref}: top-1 {format_percent(m['top1'])}, top-5 {format_percent(m['top5'])}, loss {m['loss']:.4f} "
         f"on {m['images']} {split} images")


@app.command()
@friendly
def predict(
    ref: RefArg,
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="Image files", show_default=False)],
    topk: Annotated[int, typer.Option(metavar="K", help="How many labels to show per image")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    device: DeviceOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Predict the top-k labels of images with one task."""
    from adaptkit.predict import Predictor

    results = Predictor(registry_of(registry), device=device).predict(list(images), ref, topk=topk)
    if as_json:
        out.print_json(data=[{"image": str(p), "predictions": [asdict(x) for x in r]}
                             for p, r in zip(images, results, strict=True)])
        return
    for path, preds in zip(images, results, strict=True):
        echo(escape(f"{path}: " + ", ".join(f"{p.label} {100 * p.prob:.1f}%" for p in preds)))

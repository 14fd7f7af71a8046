"""Commands that run a task: `eval` and `predict`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from adaptkit.cli.common import RegistryOpt, app, friendly, out, registry_of
from adaptkit.compare import format_percent


@app.command("eval")
@friendly
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

    m = evaluate(ref, registry=registry_of(registry), dataset=dataset, split=split, batch_size=batch_size,
                 device=device, data_dir=str(data_dir) if data_dir else None, limit=limit)
    out.print(f"{ref}: top-1 {format_percent(m['top1'])}, top-5 {format_percent(m['top5'])}, loss {m['loss']:.4f} "
              f"on {m['images']} {split} images")


@app.command()
@friendly
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

    results = Predictor(registry_of(registry), device=device).predict(list(images), ref, topk=topk)
    if as_json:
        out.print_json(data=[{"image": str(p), "predictions": [asdict(x) for x in r]}
                             for p, r in zip(images, results, strict=True)])
        return
    for path, preds in zip(images, results, strict=True):
        out.print(f"{path}: " + ", ".join(f"{p.label} {100 * p.prob:.1f}%" for p in preds))

"""Commands that run a task: `eval` and `predict`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from adaptkit.cli.common import (
    ROUTER_NAMES,
    AdaptersOpt,
    DeviceOpt,
    RefArg,
    RegistryOpt,
    RouterOpt,
    app,
    cli_words,
    echo,
    err,
    friendly,
    out,
    registry_of,
)
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
    adapters: AdaptersOpt = None,
) -> None:
    """Measure a version's accuracy on its data set's test split."""
    from adaptkit.training import evaluate

    m = evaluate(ref, registry=registry_of(registry, adapters), dataset=dataset, split=split, batch_size=batch_size,
                 device=device, data_dir=str(data_dir) if data_dir else None, limit=limit)
    echo(f"{ref}: top-1 {format_percent(m['top1'])}, top-5 {format_percent(m['top5'])}, loss {m['loss']:.4f} "
         f"on {m['images']} {split} images")


@app.command()
@friendly
def predict(
    args: Annotated[list[str], typer.Argument(metavar="[TASK] IMAGE...", show_default=False,
                                              help="Image files; with no --task each image is routed to its task "
                                                   "(a first argument that names a task and is no file pins it)")],
    task: Annotated[str | None, typer.Option("--task", "-t", metavar="TASK[@N]", help="Use this task, no "
                                             "routing")] = None,
    topk: Annotated[int, typer.Option(metavar="K", help="How many labels to show per image")] = 5,
    accept_all: Annotated[bool, typer.Option("--accept-all", help="Routed: always answer with the nearest task, "
                                             "never 'no task fits'")] = False,
    reject_rate: Annotated[float, typer.Option(metavar="RATE", help="Routed: the share of a task's own images "
                                               "that would be rejected as fitting no task (calibrated per task "
                                               "at training time)")] = 0.05,
    router: RouterOpt = ROUTER_NAMES[0],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    device: DeviceOpt = None,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
) -> None:
    """Predict the top-k labels of images: routed to the task they belong to, or with --task."""
    from adaptkit.errors import render
    from adaptkit.inference import Predictor, left_out_note

    reg = registry_of(registry, adapters)
    task, images = _task_and_images(reg, task, args)
    predictor = Predictor(reg, device=device)
    if task is not None:
        rows = [{"image": str(p), "task": predictor.load(task).ref, "predictions": [asdict(x) for x in r]}
                for p, r in zip(images, predictor.predict(list(images), task, topk=topk), strict=True)]
    else:
        routed = predictor.predict_auto(list(images), topk=topk, router=router, accept_all=accept_all,
                                         reject_rate=reject_rate)
        rows = [{"image": str(p), "task": r.task, "confidence": r.confidence, "runner_up": r.runner_up,
                 "runner_up_confidence": r.runner_up_confidence, "rejected": r.rejected, "fit": r.fit,
                 "passed_over": r.passed_over, "left_out": list(r.left_out),
                 "predictions": [asdict(x) for x in r.predictions]}
                for p, r in zip(images, routed, strict=True)]
        if routed and routed[0].left_out:
            err.print("note: " + render(left_out_note(routed[0].left_out), cli_words), markup=False, soft_wrap=True)
    if as_json:
        out.print_json(data=rows)
        return
    for row in rows:
        if row.get("rejected"):
            echo(escape(f"{row['image']}: no task fits (nearest: {row['task']}, less typical than "
                        f"{_share(1 - row['fit'])} of its own images)"))
            continue
        sure = f" ({100 * row['confidence']:.1f}% sure)" if "confidence" in row else ""
        if row.get("passed_over"):
            sure = f"{sure[:-1]}; the likelier {row['passed_over']} does not fit it)"
        labels = ", ".join(f"{p['label']} {100 * p['prob']:.1f}%" for p in row["predictions"])
        echo(escape(f"{row['image']}: {row['task']}{sure}: {labels}"))


def _share(x: float) -> str:
    """0.996 -> '99.6%', 1.0 -> 'all'."""
    return "all" if x >= 1 else f"{100 * x:.1f}%"


def _task_and_images(reg, task: str | None, args: list[str]) -> tuple[str | None, list[Path]]:
    """``--task T IMAGE...``, ``IMAGE...`` (routed), or the older ``TASK IMAGE...`` where TASK is not a file."""
    from adaptkit.data import IMG_EXTENSIONS
    from adaptkit.errors import ConfigError, NotFoundError

    first = args[0]
    if task is None and not Path(first).exists() and Path(first).suffix.lower() not in IMG_EXTENSIONS:
        try:
            reg.get_version(first)
            task, args = first, args[1:]
        except NotFoundError:
            if len(args) > 1:  # TASK IMAGE... with a task that is not there: say which tasks there are
                raise
    if not args:
        raise ConfigError("no images given: adaptkit predict [--task TASK] IMAGE...")
    return task, [Path(a) for a in args]

"""Commands for prediction with no task name and continual learning: `routing fit` and `continual`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from adaptkit.cli.common import (
    ROUTER_NAMES,
    AdaptersOpt,
    RegistryOpt,
    RouterOpt,
    app,
    echo,
    err,
    friendly,
    out,
    registry_of,
)
from adaptkit.cli.tables import Col, print_table

routing_app = typer.Typer(help="Routing statistics: what `predict` with no task needs of every task.",
                          no_args_is_help=True)
app.add_typer(routing_app, name="routing")


@routing_app.command("fit")
@friendly
def routing_fit(
    tasks: Annotated[list[str] | None, typer.Argument(help="TASK or TASK@VERSION [default: every task]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute statistics that are there already")] = False,
    dataset: Annotated[str | None, typer.Option(help="The data set to read, if not the one it was trained on "
                                                     "(one task only)")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    device: str | None = None,
    data_dir: Annotated[Path | None, typer.Option()] = None,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
) -> None:
    """Compute routing statistics for versions that lack them (trained before routing existed, or imported), or
    lack the thresholds that tell an image of no task (trained before those existed)."""
    from adaptkit.inference import fit_routing

    done = fit_routing(tasks or None, registry=registry_of(registry, adapters), force=force, dataset=dataset,
                       device=device, data_dir=str(data_dir) if data_dir else None, batch_size=batch_size,
                       on_task=lambda ref, what: err.print(f"{ref}: {what}", soft_wrap=True))
    echo(escape(f"wrote routing statistics for {len(done)} version(s)" + (f": {', '.join(done)}" if done else "")))


@app.command()
@friendly
def continual(
    tasks: Annotated[list[str] | None, typer.Argument(help="TASK or TASK@VERSION in the order to add them "
                                                            "[default: every task, in the order registered]")] = None,
    router: RouterOpt = ROUTER_NAMES[0],
    limit: Annotated[int | None, typer.Option(min=1, help="Test images per task")] = None,
    refine: Annotated[bool, typer.Option(help="Also measure routing refined by the top-2 tasks' adapters")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    device: str | None = None,
    data_dir: Annotated[Path | None, typer.Option()] = None,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
) -> None:
    """Evaluate the tasks as a class-incremental sequence: accuracy with no task name after each addition."""
    from adaptkit.inference import evaluate_continual

    r = evaluate_continual(tasks or None, registry=registry_of(registry, adapters), router=router, limit=limit,
                           device=device, data_dir=str(data_dir) if data_dir else None, batch_size=batch_size,
                           refine=refine)
    if as_json:
        out.print_json(json.dumps(r.to_dict()))
        return
    names = ["task-id", "no task", "task given", "SimpleCIL", *(["refined"] if refine else [])]
    rows = [[f"{k + 1}. {ref}", *(f"{100 * c:.1f}" for c in cells)]
            for k, (ref, *cells) in enumerate(zip(r.tasks, r.task_id, r.cil, r.til, r.simplecil,
                                                  *([r.refined] if refine else []), strict=True))]
    _table("Accuracy (%) after each task is added, no task name given",
           [Col("after", whole=True), *(Col(n, True) for n in names)], rows)
    _table("No-task accuracy (%) on each task's test images (rows: after task k)",
           [Col("after", True), *(Col(str(j + 1), True) for j in range(len(r.tasks)))],
           [[str(k + 1), *("" if a is None else f"{100 * a:.1f}" for a in row)] for k, row in enumerate(r.matrix)])
    out.print(f"average incremental accuracy {100 * r.average_incremental:.1f}%, final {100 * r.final:.1f}%, "
              f"forgetting {100 * r.forgetting:.1f} points, router {r.router}, {sum(r.images)} test images",
              soft_wrap=True)


def _table(title: str, cols: list[Col], rows: list[list[str]]) -> None:
    """A table under its title: fitted to the terminal, or plain when piped (the title then a line of its own)."""
    if not out.is_terminal:
        echo(title)
    print_table(out, cols, rows, title=title)

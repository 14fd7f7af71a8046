"""`adaptkit ui`: the web page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adaptkit.cli.common import AdaptersOpt, RegistryOpt, app, friendly


@app.command()
@friendly
def ui(
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(metavar="PORT", help="Port [default: Gradio's, 7860]")] = None,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
    data_root: Annotated[list[Path] | None, typer.Option(
        "--data-root", metavar="PATH", help="A folder whose sub-folders the page may train from (repeatable) "
        "[default: adaptkit's data folder]")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Prediction requests that share one backbone pass")] = 32,
) -> None:
    """Start the web page.

    Upload an image, switch tasks, compare costs, add a task.
    """
    from adaptkit.checks import check_int
    from adaptkit.data.roots import resolve_roots

    check_int("--port", port, 1, 65535, optional=True)  # before the slow import of the page
    roots = resolve_roots(data_root) if data_root is not None else None
    from adaptkit_app.main import launch

    page = launch(registry=registry, adapters=adapters, host=host, port=port, data_roots=roots,
                  max_batch_size=max_batch, quiet=True, prevent_thread_lock=True)
    typer.echo(f"adaptkit page on {page.local_url} (Ctrl+C to stop)")
    page.block_thread()

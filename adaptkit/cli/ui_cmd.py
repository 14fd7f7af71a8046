"""`adaptkit ui`: the web page."""

from __future__ import annotations

from typing import Annotated

import typer

from adaptkit.cli.common import RegistryOpt, app, friendly


@app.command()
@friendly
def ui(
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(metavar="PORT", help="Port [default: Gradio's, 7860]")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Start the web page.

    Upload an image, switch tasks, compare costs, add a task.
    """
    from adaptkit.checks import check_int

    check_int("--port", port, 1, 65535, optional=True)  # before Gradio's slow import
    from adaptkit_app.main import launch

    launch(registry=registry, host=host, port=port)

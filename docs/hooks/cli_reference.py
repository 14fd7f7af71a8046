"""mkdocs hook: the command-line reference page, generated from the Typer app at build time (never out of date)."""

from __future__ import annotations

from mkdocs.structure.files import File, Files


def _reference() -> str:
    import typer
    from typer.cli import get_docs_for_click

    from adaptkit.cli import app

    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="adaptkit")
    text = get_docs_for_click(obj=command, ctx=ctx, name="adaptkit", title="Command-line reference")
    intro = ("Generated from the Typer app by `docs/hooks/cli_reference.py` when the site is built; "
             "`adaptkit COMMAND --help` prints the same. What the commands promise is in "
             "[The command line](../commands.md).\n\n")
    head, _, rest = text.partition("\n\n")
    return f"{head}\n\n{intro}{rest.strip()}\n"


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "reference/cli.md", content=_reference()))
    return files

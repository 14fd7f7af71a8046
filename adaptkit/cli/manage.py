"""Commands that change the registry: `remove`, `default`, `export`, `import`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from adaptkit.cli.common import RegistryOpt, app, friendly, out, registry_of
from adaptkit.errors import ConfigError


@app.command()
@friendly
def remove(
    ref: Annotated[str, typer.Argument(help="TASK (every version) or TASK@VERSION")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Remove a task or one of its versions, with its adapter file."""
    reg = registry_of(registry)
    reg.get_version(ref, allow_broken=True)  # a broken version can always be removed
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"removing {ref} deletes its adapter file(s): pass --yes to confirm")
        typer.confirm(f"remove {ref} and its adapter file(s)?", abort=True)
    removed = reg.remove(ref)
    out.print(f"removed {', '.join(removed)}")


@app.command()
@friendly
def default(ref: Annotated[str, typer.Argument(help="TASK@VERSION")], registry: RegistryOpt = None) -> None:
    """Make a version its task's default."""
    v = registry_of(registry).set_default(ref)
    out.print(f"{v.ref} is now the default of {v.task.name}")


@app.command()
@friendly
def export(
    ref: Annotated[str, typer.Argument(help="TASK or TASK@VERSION")],
    file: Annotated[Path, typer.Argument(help="Destination .safetensors file or folder")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Write a version's self-describing adapter file, to share or import elsewhere."""
    dest = registry_of(registry).export(ref, file, overwrite=force)
    out.print(f"exported {ref} to {dest}")


@app.command("import")
@friendly
def import_file(
    file: Annotated[Path, typer.Argument(help="An exported adapter .safetensors file")],
    task: Annotated[str | None, typer.Option(help="Register under this task name [default: the file's]")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Add an exported adapter file to this registry as a new version."""
    v = registry_of(registry).import_file(file, task=task)
    out.print(f"imported {file} as {v.ref}")

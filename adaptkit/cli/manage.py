"""Commands that change the registry: `remove`, `default`, `export`, `import`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from adaptkit.cli.common import AdaptersOpt, RefArg, RegistryOpt, app, echo, friendly, registry_of
from adaptkit.errors import ConfigError


@app.command()
@friendly
def remove(
    ref: Annotated[str, typer.Argument(metavar="TASK[@N]", help="A task (every version) or one version TASK@N",
                                       show_default=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
) -> None:
    """Remove a task or one of its versions, with its adapter file."""
    reg = registry_of(registry, adapters)
    reg.get_version(ref, allow_broken=True)  # a broken version can always be removed
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"removing {ref} deletes its adapter file(s): pass --yes to confirm")
        typer.confirm(f"remove {ref} and its adapter file(s)?", abort=True)
    removed = reg.remove(ref)
    echo(f"removed {', '.join(removed)}")


@app.command()
@friendly
def default(ref: Annotated[str, typer.Argument(metavar="TASK@N", help="The version to make the default",
                                              show_default=False)], registry: RegistryOpt = None,
            adapters: AdaptersOpt = None) -> None:
    """Make a version its task's default."""
    v = registry_of(registry, adapters).set_default(ref)
    echo(f"{v.ref} is now the default of {v.task.name}")


@app.command()
@friendly
def export(
    ref: RefArg,
    file: Annotated[Path, typer.Argument(metavar="DEST", help="Destination .safetensors file or folder",
                                         show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file")] = False,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
) -> None:
    """Write a version's adapter file, to import elsewhere.

    The file describes itself (task, classes, method, backbone), so `adaptkit import` needs nothing else.
    """
    dest = registry_of(registry, adapters).export(ref, file, overwrite=force)
    echo(f"exported {ref} to {dest}")


@app.command("import")
@friendly
def import_file(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="An exported adapter .safetensors file",
                                         show_default=False)],
    task: Annotated[str | None, typer.Option(metavar="NAME", help="Register under this task name [default: the "
                                             "file's]")] = None,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
) -> None:
    """Add an exported adapter file to this registry as a new version."""
    v = registry_of(registry, adapters).import_file(file, task=task)
    echo(f"imported {file} as {v.ref}")

"""`adaptkit doctor`: check the registry's rows against its files, and repair them."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from adaptkit.cli.common import AdaptersOpt, RegistryOpt, app, echo, friendly, out, registry_of


@app.command()
@friendly
def doctor(
    repair: Annotated[bool, typer.Option("--repair", help="Fix what is found: remove unusable versions, set "
                                         "defaults, delete crash leftovers")] = False,
    min_age: Annotated[float | None, typer.Option("--min-age", min=0, help="Seconds: a file no row refers to "
                                                  "counts as a leftover only when older, on a store without "
                                                  "locks (S3) where a write may be in flight (default 3600); a "
                                                  "local folder whose lock a writer holds is left alone")] = None,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
) -> None:
    """Check every version's row and file; report (and with --repair fix) what is inconsistent.

    Exit status 1 when something is left to repair.
    """
    from adaptkit.registry.doctor import diagnose
    reg = registry_of(registry, adapters)
    findings = diagnose(reg, repair=repair, min_age_s=min_age)
    for f in findings:
        state = "repaired" if f.repaired else ("left alone" if not f.repairable else "to repair")
        out.print(f"{f.kind}: {f.what}: {f.detail} [{state}]", soft_wrap=True, markup=False)
    left = [f for f in findings if f.repairable and not f.repaired]
    if not findings:
        echo(escape(f"registry {reg.url} with adapters in {reg.storage.url}: every row has its file, nothing left "
                    "over"))
    elif left:
        echo(f"{len(left)} problem(s) to repair: run `adaptkit doctor --repair`")
        raise typer.Exit(1)
    else:
        echo(f"{sum(f.repaired for f in findings)} problem(s) repaired")

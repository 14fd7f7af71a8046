"""What every command shares: the Typer app, the consoles, the registry option and the error boundary.

Every :class:`~adaptkit.errors.AdaptkitError` becomes a one-line message on stderr and exit status 1.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

from adaptkit.errors import AdaptkitError

app = typer.Typer(help="Adapt one frozen Vision Transformer to many image tasks.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

RegistryOpt = Annotated[str | None, typer.Option("--registry", "-r", help="Registry path or SQLAlchemy URL "
                                                 "[default: $ADAPTKIT_REGISTRY or ./registry.db]")]


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line and exit 1; Ctrl-C into exit 130 with nothing saved."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AdaptkitError as exc:
            err.print(f"[red]error:[/red] {exc}", markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted: nothing was written to the registry")
            raise typer.Exit(130) from None

    return wrapper


def registry_of(url: str | None):
    from adaptkit.registry import Registry

    return Registry(url)


def count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what adaptkit does")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")

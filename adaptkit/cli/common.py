"""What every command shares: the Typer app, the consoles, the registry and adapter-store options and the error
boundary.

Every :class:`~adaptkit.errors.AdaptkitError` becomes a one-line message on stderr and exit status 1.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from adaptkit.errors import AdaptkitError


class OneLineErrors(typer.core.TyperGroup):
    """Usage errors as one line (``error: ... (see `adaptkit train --help`)``, exit 2) instead of click's three."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except typer.TyperException as exc:  # click's exceptions, as Typer carries them
            code = getattr(exc, "exit_code", 2)
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # the help text itself
            else:
                ctx = getattr(exc, "ctx", None)
                fail(exc.format_message() + (f" (see `{ctx.command_path} --help`)" if ctx is not None else ""))
        except typer.Abort:
            err.print("aborted: nothing was changed")
            code = 1
        sys.exit(code if isinstance(code, int) else 0)


class PlainHelp(typer.core.TyperCommand):
    """Help as Unix tools write it: ``Usage: adaptkit predict [OPTIONS] TASK[@N] IMAGE...``, arguments by their
    metavar, no ``{braces}`` or ``<type>`` labels."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = _arg_name(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: typer.Context, formatter: Any) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((_arg_name(param), record[1]))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _arg_name(param: Any) -> str:
    name = param.metavar or param.name.upper()
    return name if param.nargs == 1 or name.endswith("...") else f"{name}..."


class _Typer(typer.Typer):
    """Every command of the app gets :class:`PlainHelp`."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", PlainHelp)
        return super().command(*args, **kwargs)


app = _Typer(name="adaptkit", cls=OneLineErrors, help="Adapt one frozen Vision Transformer to many image tasks.",
             no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None,
             context_settings={"help_option_names": ["-h", "--help"]})
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
_log = logging.getLogger("adaptkit.cli")

RegistryOpt = Annotated[str | None, typer.Option("--registry", "-r", metavar="PATH|URL",
                                                 help="Registry file or SQLAlchemy URL "
                                                 "[default: $ADAPTKIT_REGISTRY or ./registry.db]")]
AdaptersOpt = Annotated[str | None, typer.Option("--adapters", metavar="PATH|URL",
                                                 help="Adapter store: a local folder or s3://bucket/prefix "
                                                 "[default: $ADAPTKIT_ADAPTERS or adapters/ beside the registry]")]
RefArg = Annotated[str, typer.Argument(metavar="TASK[@N]", help="A task (its default version) or TASK@N",
                                       show_default=False)]
# adaptkit.inference.router's ROUTERS and DEFAULT_ROUTER (that module imports torch; tests/test_routing.py checks)
ROUTER_NAMES = ("qda", "lda", "ridge", "ncm")


def _router_name(value: str) -> str:
    if value not in ROUTER_NAMES:
        raise typer.BadParameter(f"{value!r} is no router: use one of {', '.join(ROUTER_NAMES)}")
    return value


RouterOpt = Annotated[str, typer.Option(metavar="ROUTER", callback=_router_name,
                                        help="How a task is picked with no task named: qda (each data set's own "
                                        "spread), lda (one spread for all), ridge or ncm")]
DeviceOpt = Annotated[str | None, typer.Option(metavar="DEVICE", help="cpu, cuda, cuda:N or mps "
                                               "[default: cuda if available]")]


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(text).split())


def fail(message: str) -> None:
    """Print ``error: message`` as one line on stderr (markup in the message is not interpreted)."""
    err.print("[red]error:[/red] " + escape(one_line(message)), soft_wrap=True)


def plain() -> bool:
    """True when stdout or stderr is not a terminal (a log file, a pipe, CI, nohup): print plain lines then."""
    return not (out.is_terminal and err.is_terminal)


def echo(text: str) -> None:
    """Print a line of output; piped, it is never broken into several lines."""
    out.print(text, soft_wrap=plain())


def cli_words(name: str, value: str | None) -> str:
    """A setting named by an error (:func:`adaptkit.errors.param`) as the command line spells it, from the Typer
    option of that name: ``--weights FILE``, ``--no-pretrained``, ``--device cpu`` (``--name`` where none has it)."""
    if name.startswith("!"):  # a step (adaptkit.errors.step): the command that does it
        bare, aimed = _CLI_STEPS.get(name[1:], (f"adaptkit {name[1:]}", f"adaptkit {name[1:]} {{}}"))
        return "`" + (aimed.format(value) if value else bare) + "`"
    opt = _option(_every_option(), _CLI_NAMES.get(name, name))
    longs = [o for o in (opt.opts if opt else []) if o.startswith("--")]
    flag = longs[0] if longs else "--" + name.replace("_", "-")
    if value is None:
        metavar = None if opt is None or opt.is_flag else opt.metavar
        return f"{flag} {metavar}" if metavar else flag
    if value in ("True", "False") and (opt is None or opt.is_flag):
        if value == "True":
            return flag
        no = [o for o in (opt.secondary_opts if opt else []) if o.startswith("--")]
        return no[0] if no else "--no-" + flag[2:]
    return f"{flag} {value}"


_CLI_NAMES = {"overwrite": "force"}  # Python parameters whose command-line option is named otherwise
#: the steps errors name (adaptkit.errors.step) as commands: (with no target, with one)
_CLI_STEPS = {
    "train": ("adaptkit train --dataset ...", "adaptkit train --task {} ..."),
    "routing_fit": ("adaptkit routing fit", "adaptkit routing fit {}"),
    "routing_refit": ("adaptkit routing fit --force", "adaptkit routing fit {} --force"),
}


def _option(params: list, name: str) -> Any:
    return next((p for p in params if p.name == name and getattr(p, "param_type_name", "") == "option"), None)


@functools.cache
def _every_option() -> list:
    """Every option of every command (for a setting the running command does not have, or outside a command)."""
    import typer

    from adaptkit.cli import app

    group = typer.main.get_command(app)
    out = []
    for command in group.commands.values():
        out += command.params
        out += [p for sub in getattr(command, "commands", {}).values() for p in sub.params]
    return out


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line and exit 1; Ctrl-C into exit 130 with nothing saved.

    An unexpected exception is one line too (``--verbose`` logs its traceback), so a user never reads a traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except AdaptkitError as exc:
            fail(exc.worded(cli_words))
        except KeyboardInterrupt:
            err.print("interrupted: nothing was written to the registry")
            raise typer.Exit(130) from None
        except OSError as exc:  # a full disk, a folder without write permission ...
            where = f" ({exc.filename})" if exc.filename else ""
            fail(f"{exc.strerror or exc}{where}: free space or fix permissions and try again")
        except Exception as exc:  # noqa: BLE001 - the one place that turns a bug into a line instead of a traceback
            _log.info("unexpected error", exc_info=True)
            fail(f"unexpected {type(exc).__name__}: {exc}. Run with --verbose for details, and please report it")
        raise typer.Exit(1)

    return wrapper


def registry_of(url: str | None, adapters: str | None = None):
    """The registry of ``--registry`` with its adapter store from ``--adapters`` (None: their defaults)."""
    from adaptkit.registry import Registry

    return Registry(url, adapter_dir=adapters)


def count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


class _ConsoleLog(logging.Handler):
    """Log records as ``warning: ...`` lines on the stderr console, which prints them above a live progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        err.print(f"{record.levelname.lower()}: {text}", markup=False, highlight=False, soft_wrap=True)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what adaptkit does")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[_ConsoleLog()])

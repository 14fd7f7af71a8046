"""How the page speaks: a library error in the page's words (its settings named by the page's fields, its steps by
the tab that does them, never a server path), and the one error boundary around every handler."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from adaptkit.data import open_image
from adaptkit.errors import AdaptkitError

__all__ = ["page_words", "page_terms", "user_errors", "open_upload"]

_log = logging.getLogger("adaptkit_app.handlers")


#: how the page names a setting an error names (see adaptkit.errors.param): its field, or what to do instead
_PAGE_WORDS = {
    ("pretrained", "False"): 'untick "Pretrained weights"',
    ("pretrained", "True"): 'tick "Pretrained weights"',
    ("weights", None): "a weights file (on the command line: the page has no field for one)",
    ("backbone", None): '"Backbone"',
    ("image_size", None): '"Image size"',
    ("task", None): '"Task name"',
    ("epochs", None): '"Epochs"',
    ("batch_size", None): '"Batch size"',
    ("lr", None): '"Learning rate"',
    ("rank", None): '"Rank"',
    ("limit_train", None): '"Training images" (0: all)',
    ("classes", None): "classes (chosen on the command line: the page trains on all)",
    ("limit_eval", None): '"Validation and test images"',
    ("method", None): '"Method"',
    ("dataset", None): '"Data set"',
    ("topk", None): '"Top-k labels"',
    ("registry", None): "registry (start the page on another)",
}


def page_words(name: str, value: str | None) -> str | None:
    """A setting as the page names it (None: the library's own wording); a step as the tab that does it."""
    if name == "!train":
        return "**Add a task**" + (f' (as "{value}")' if value else "")
    if name.startswith("!routing_"):  # the page has no such step: whoever runs it has the command line
        force = " --force" if name == "!routing_refit" else ""
        return f"`adaptkit routing fit{' ' + value if value else ''}{force}` (on the command line)"
    return _PAGE_WORDS.get((name, value)) or (None if value is None else _PAGE_WORDS.get((name, None)))


def page_terms(message: str | AdaptkitError) -> str:
    """A library error (or its message) in the page's words: its settings named by the page's fields."""
    if isinstance(message, AdaptkitError):
        message = message.worded(page_words)
    return message


def user_errors(fn: Callable) -> Callable:
    """Show an AdaptkitError's message on the page until dismissed; log anything else and show a short message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except AdaptkitError as exc:
            raise gr.Error(page_terms(exc), duration=None, print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - the page must stay up whatever happens
            _log.exception("%s failed", fn.__name__)
            raise gr.Error(f"{fn.__name__.strip('_')} failed unexpectedly ({type(exc).__name__}); the server log "
                           "has the details.", duration=None, print_exception=False) from None

    return wrapper


def open_upload(path: str) -> Any:
    """Open an uploaded file as an image; an error names "the uploaded file", never the server's temporary path."""
    try:
        return open_image(path)
    except AdaptkitError as exc:
        message = str(exc).replace(str(path), "the uploaded file").replace(Path(path).name, "the uploaded file")
        raise type(exc)(message[:1].upper() + message[1:]) from None

"""The database's own refusals as one-line :class:`RegistryError` messages that say what to do.

A registry path can be a text file, another program's SQLite file, a damaged database, a read-only file or folder,
or sit on a full disk. SQLite says so in its error text; an engine event turns those into :class:`RegistryError`
wherever a query runs. "database is locked" is left alone: the registry retries it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from adaptkit.errors import RegistryError, param

__all__ = ["advice", "explain_database_errors"]

_WHAT_TO_DO = [
    (("file is not a database", "malformed", "disk i/o error"),
     "is not a SQLite database or is damaged: restore it from a backup, or pass another --registry"),
    (("no such column", "no such table", "has no column"),
     "was not made by adaptkit (another program's database?): pass another " + param("registry")),
    (("readonly database", "read-only", "unable to open database"),
     "cannot be opened for writing (read-only file or folder?): fix its permissions or pass another "
     + param("registry")),
    (("database or disk is full",), "cannot grow: the disk is full; free some space"),
]


def explain_database_errors(engine: Engine, url: str) -> None:
    """Make ``engine`` raise :class:`RegistryError` for the database errors above."""

    @event.listens_for(engine, "handle_error")
    def _explain(context: Any) -> RegistryError | None:
        text = str(getattr(context.original_exception, "args", [""])[0]).lower()
        what = advice(text)
        return RegistryError(f"registry {url} {what} ({text})") if what else None


def advice(text: str) -> str | None:
    """What to do about a SQLite error whose (lower-case) text is ``text``, or None if it is not one of ours."""
    return next((what for needles, what in _WHAT_TO_DO if any(n in text for n in needles)), None)

"""Temporary files and folders of atomic writes (``.NAME.<random>.tmp`` beside ``NAME``), and how the leftovers of a
killed writer are told from a write in progress.

A writer holds an exclusive ``flock`` on its temporary file (or folder) from its creation to its rename; a killed
process holds none. So before writing ``NAME`` a writer removes the ``.NAME.*.tmp`` beside it that it can lock and
that are older than :data:`STALE_AFTER_S` (the age keeps a temporary file that is just created, not yet locked):
those are provably a dead writer's. Where there is no ``flock`` (Windows) nothing is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:
    fcntl = None

__all__ = ["STALE_AFTER_S", "folder_beside", "hold", "remove_stale", "temp_beside"]

STALE_AFTER_S = 10.0


def temp_beside(path: Path) -> Path:
    """A fresh temporary name beside ``path``: ``.NAME.<random>.tmp``."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def hold(fd: int) -> None:
    """Mark the temporary file or folder open as ``fd`` as in use, until ``fd`` is closed."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def _dead(path: Path) -> bool:
    """Whether no live process holds ``path`` (its writer was killed)."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale(path: Path) -> list[Path]:
    """Remove the temporary files and folders that killed writers of ``path`` left beside it; returns them."""
    if fcntl is None or not path.parent.is_dir():
        return []
    pattern, now, removed = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.tmp"), time.time(), []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            tmp = Path(entry.path)
            if not pattern.fullmatch(entry.name) or entry.is_symlink():
                continue
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime >= STALE_AFTER_S and _dead(tmp):
                    shutil.rmtree(tmp) if entry.is_dir() else tmp.unlink()
                    removed.append(tmp)
    return removed


@contextlib.contextmanager
def folder_beside(dest: Path) -> Iterator[Path]:
    """A held temporary folder beside ``dest`` to fill; on leaving the block it becomes ``dest``, or, where ``dest``
    is a folder already, its files replace those of the same names (all checked first: a name there that is no
    file is an IsADirectoryError before any file moves). Removed whatever happens; a killed writer's goes on the
    next call."""
    tmp, fd = temp_beside(dest), None
    try:
        os.mkdir(tmp, 0o777)
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        hold(fd)
        remove_stale(dest)
        yield tmp
        if not dest.exists():
            os.replace(tmp, dest)
            return
        blocked = sorted(f.name for f in tmp.iterdir()
                         if os.path.lexists(dest / f.name) and not (dest / f.name).is_file())
        if blocked:
            raise IsADirectoryError(errno.EISDIR, f"it holds {', '.join(blocked)} as something other than a file "
                                    "(a folder?): move that away or write to another folder")
        for f in tmp.iterdir():
            os.replace(f, dest / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            os.close(fd)

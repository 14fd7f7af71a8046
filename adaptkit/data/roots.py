"""Data roots: the folders a remote user (the web page) may train from, and nothing outside them.

A folder typed into the page is resolved (``~``, ``..`` and symbolic links followed) and accepted only when it lies
inside one of the roots; a refusal never says what is on the server's disk beyond the roots themselves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from adaptkit.errors import DatasetError

__all__ = ["resolve_roots", "folder_in_roots"]


def resolve_roots(roots: Sequence[str | os.PathLike]) -> list[Path]:
    """Resolve each root and check it is a folder, keeping their order and dropping repeats.

    Raises:
        DatasetError: a root does not exist or is not a folder.
    """
    out: list[Path] = []
    for root in roots:
        path = Path(root).expanduser().resolve()
        if not path.is_dir():
            raise DatasetError(f"data root {root} is not a folder: create it or pass another --data-root")
        if path not in out:
            out.append(path)
    return out


def folder_in_roots(folder: str, roots: Sequence[Path], *, files: bool = False) -> Path:
    """The folder named by ``folder`` (absolute, or relative to the first root) if it lies inside a root.

    ``files``: a regular file (a ``.parquet`` file) inside a root is accepted too.

    Raises:
        DatasetError: no roots are configured, or the folder is outside every root or does not exist.
    """
    allowed = ", ".join(str(r) for r in roots)
    if not roots:
        raise DatasetError("this page trains from no folders: pick a data set instead (whoever runs the page can "
                           "allow the folders under PATH with adaptkit ui --data-root PATH)")
    text = folder.strip()
    path = Path(text).expanduser()
    path = (path if path.is_absolute() else roots[0] / path).resolve()
    if not any(path == r or path.is_relative_to(r) for r in roots):
        raise DatasetError(f"folder {text!r} is outside the data roots of this page ({allowed}): give a folder "
                           "inside one of them (whoever runs the page can add roots with adaptkit ui --data-root)")
    if not path.is_dir() and not (files and path.is_file()):
        raise DatasetError(f"folder {text!r} does not exist under the data roots ({allowed}): give a folder with "
                           "one sub-folder of images per class")
    return path

"""What a data set may read: its own files, regular ones, and (for the web page) nothing outside the data roots.

A data set names files inside itself: a saved Hugging Face set's ``state.json`` names its arrow files, a parquet or
arrow table may name each image by a path or a URL, a class folder may be a symbolic link. Those names are checked
here before anything is opened: an image named by a URL is never fetched, a saved set's files are plain names inside
its folder, a named file must be a regular file (a FIFO or a device would block the reader forever), and with
``roots`` (the page's data roots, see :mod:`adaptkit.data.roots`) every file must resolve inside one of them. A
refusal never says where a path outside the roots leads.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from adaptkit.errors import DatasetError

__all__ = ["check_inside", "check_regular", "check_saved_dataset", "check_image_refs", "is_url"]

MAX_JSON_BYTES = 1 << 20  # a saved set's state.json / dataset_dict.json: a few hundred bytes


def is_url(path: str) -> bool:
    """A path with a scheme (``http://``, ``hf://``, ``s3://`` ...): datasets would fetch it."""
    return urlparse(path).scheme != ""


def check_inside(path: Path, roots: Sequence[Path] | None, what: str) -> None:
    """With ``roots``, refuse a path that does not resolve inside one of them (``..``, absolute, a link)."""
    if roots is None:
        return
    resolved = Path(path).expanduser().resolve()
    if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
        raise DatasetError(f"{what} lies outside the data roots of this page (an absolute path, '..' or a link): "
                           "give a data set whose files all lie inside the data roots")


def check_regular(path: Path, what: str) -> None:
    """Refuse anything but a regular file (after links) before it is opened: a FIFO or a device blocks its reader."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise DatasetError(f"{what} cannot be read ({exc.strerror}): restore it or save the data set again") from None
    if not stat.S_ISREG(mode):
        raise DatasetError(f"{what} is not a regular file (a folder, pipe, socket or device): save the data set again")


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\x00" not in name


def _read_json(path: Path, what: str) -> Any:
    check_regular(path, what)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise DatasetError(f"{what} is over {MAX_JSON_BYTES >> 20} MiB: it is not a file save_to_disk wrote")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{what} is not readable JSON ({exc}): save the data set again") from None


def _check_split_folder(folder: Path, roots: Sequence[Path] | None, label: str) -> None:
    state = folder / "state.json"
    if not state.exists():
        return  # not a saved Dataset: datasets says what it lacks
    data = _read_json(state, f"{label}/state.json")
    files = data.get("_data_files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        raise DatasetError(f"{label}/state.json names no data files (_data_files): save the data set again")
    for entry in files:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not _plain_name(name):
            raise DatasetError(f"{label}/state.json names the data file {str(name)[:80]!r}, which is not a plain "
                               "file name inside the data set's folder: save the data set again")
        check_inside(folder / name, roots, f"data file {name} of {label}")
        check_regular(folder / name, f"data file {name} of {label}")


def check_saved_dataset(folder: Path, roots: Sequence[Path] | None = None) -> None:
    """Check a ``save_to_disk`` folder before datasets opens it: the splits of ``dataset_dict.json`` and the data
    files of each ``state.json`` are plain names of regular files inside it (inside ``roots`` too, if given)."""
    check_inside(folder, roots, f"data set folder {folder.name}")
    listing = folder / "dataset_dict.json"
    if listing.exists():
        data = _read_json(listing, f"{folder.name}/dataset_dict.json")
        splits = data.get("splits") if isinstance(data, dict) else None
        if not isinstance(splits, list):
            raise DatasetError(f"{folder.name}/dataset_dict.json names no splits: save the data set again")
        for split in splits:
            if not _plain_name(split):
                raise DatasetError(f"{folder.name}/dataset_dict.json names the split {str(split)[:80]!r}, which is "
                                   "not a plain folder name inside the data set: save the data set again")
            check_inside(folder / split, roots, f"split {split} of {folder.name}")
            _check_split_folder(folder / split, roots, f"{folder.name}/{split}")
    else:
        _check_split_folder(folder, roots, folder.name)


def check_image_refs(refs: list[tuple[int, str]], roots: Sequence[Path] | None, name: str) -> None:
    """Check the images a table names by path (``(row, path)`` for rows without image bytes): none is a URL, and
    with ``roots`` each lies inside them."""
    for row, path in refs:
        if is_url(path):
            raise DatasetError(f"row {row} of {name} names its image by URL ({urlparse(path).scheme}://...): "
                               "adaptkit never fetches images a data set names; put the image files or their bytes "
                               "in the data set")
        check_inside(Path(path), roots, f"the image of row {row} of {name}")

"""Hugging Face ``datasets`` as a data source: ``hf:NAME[:CONFIG]``, ``hf-disk:PATH`` and ``hf-files:PATH``.

``datasets`` is imported only when such a spec is loaded, so ``import adaptkit`` stays fast without it. The image
column is the one whose feature is ``datasets.Image`` and the label column the ``ClassLabel`` one, unless named. The
splits map as train -> train, validation / valid / val -> val (instead of carving it out of train) and test -> test; a
set without a test split gets a seeded stratified one carved out of train, as the other sources do.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from adaptkit.data.confine import check_image_refs, check_inside, check_regular, check_saved_dataset, is_url
from adaptkit.data.images import IMG_EXTENSIONS, MAX_SIDE, open_image, to_rgb
from adaptkit.data.sources import SPLIT_SEED, TEST_FRACTION, _split_by_class, _Splits
from adaptkit.errors import DatasetError, ImageError, param

__all__ = ["HF_SPECS", "HFImages", "load_hf"]

HF_SPECS = ("hf:", "hf-disk:", "hf-files:")
HUB_PROBE_TIMEOUT_S = 3.0
VAL_SPLITS = ("validation", "valid", "val")
_ALTERNATIVES = "hf-disk:PATH (a save_to_disk folder), hf-files:PATH (imagefolder or parquet files) or folder:PATH"
_TRUE = {"1", "ON", "YES", "TRUE"}
_log = logging.getLogger(__name__)


class HFImages(Dataset):
    """One split of a Hugging Face data set; yields (RGB PIL image, int label), the image decoded per item.

    Attributes:
        targets: the label of every row (index into the task's classes), -1 for a row without one.
    """

    def __init__(self, table: Any, image_column: str, targets: list[int], name: str) -> None:
        self.table = table.select_columns([image_column])  # labels are in `targets`; other columns are never read
        self.image_column, self.targets, self.name = image_column, targets, name

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        cell = self.table[int(i)][self.image_column]  # {"bytes", "path"}: decoded here, never by datasets
        try:
            img = _decode(cell)
        except (OSError, ValueError, Image.DecompressionBombError, ImageError) as exc:
            raise DatasetError(f"cannot read the image in row {i} of {self.name} ({_first_line(exc)}): fix or drop "
                               "that row") from exc
        if not isinstance(img, Image.Image):
            raise DatasetError(f"row {i} of {self.name} has no image in column '{self.image_column}': fix or drop it")
        img = to_rgb(img)
        img.thumbnail((MAX_SIDE, MAX_SIDE))  # decoded afresh for each item; the model resizes it anyway
        return img, self.targets[int(i)]


def _decode(cell: Any) -> Image.Image | None:
    """An image cell (``{"bytes", "path"}``, as ``datasets.Image(decode=False)`` gives it) as a loaded PIL image:
    from its bytes, else from its local path (a regular file; a URL is never fetched); None for no image."""
    if isinstance(cell, Image.Image):
        return cell
    if not isinstance(cell, dict):
        return None
    if cell.get("bytes"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(cell["bytes"]))
            img.load()
        return img
    path = cell.get("path")
    if not isinstance(path, str) or not path:
        return None
    if is_url(path):
        raise ValueError(f"its image is named by URL ({urlparse(path).scheme}://...), which adaptkit never fetches")
    return open_image(path)  # a regular file only: a FIFO would block


def _image_refs(table: Any, column: str) -> list[tuple[int, str]]:
    """(row, path) of the rows of ``table`` whose image (a ``datasets.Image(decode=False)`` column) is a path."""
    import pyarrow.compute as pc

    out: list[tuple[int, str]] = []
    start = 0
    for cells in table.data.column(column).chunks:  # chunk by chunk: the image bytes are never copied
        paths, data = pc.struct_field(cells, "path"), pc.struct_field(cells, "bytes")
        named = pc.and_(pc.is_null(data), pc.invert(pc.is_null(paths)))
        rows = [start + r for r in pc.indices_nonzero(named).to_pylist()]
        out += zip(rows, pc.filter(paths, named).to_pylist(), strict=True)
        start += len(cells)
    return out


def _first_line(exc: BaseException) -> str:
    return next(iter(str(exc).splitlines()), "") or type(exc).__name__


def _hub_reachable(endpoint: str) -> bool:
    """A socket connect to the hub within HUB_PROBE_TIMEOUT_S; behind a proxy the library is left to find out."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode(datasets: Any) -> Iterator[None]:
    """Switch the hub clients to offline mode (cache only, no retries) for the duration; restored afterwards."""
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _bars_at_a_terminal(datasets: Any) -> Iterator[None]:
    """``datasets``' own progress bars (generating splits, loading shards) only when stderr is a terminal: piped or
    logged, they would be lines of carriage returns in someone's output. Restored afterwards."""
    quiet = not sys.stderr.isatty() and not datasets.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _from_hub(datasets: Any, arg: str) -> Any:
    name, _, config = (s.strip() for s in arg.partition(":"))
    if not name:
        raise DatasetError("hf: needs a data set name from the Hugging Face hub, e.g. hf:uoft-cs/cifar10 or "
                           f"hf:NAME:CONFIG; or use {_ALTERNATIVES}")
    env_offline = any(os.environ.get(v, "").strip().upper() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    why = ("offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if env_offline
           else None if _hub_reachable(datasets.config.HF_ENDPOINT) else "the hub cannot be reached")
    try:
        with _offline_mode(datasets) if why else contextlib.nullcontext():
            return datasets.load_dataset(name, config or None)
    except Exception as exc:  # noqa: BLE001 - the hub client raises many types; each becomes one message
        detail = _first_line(exc)
        if why:
            raise DatasetError(f"cannot load hf:{arg}: {why} and it is not in the datasets cache ({detail}). "
                               f"Offline, use {_ALTERNATIVES}") from exc
        raise DatasetError(f"cannot load hf:{arg} from the Hugging Face hub ({detail}): check the name and "
                           f"config, or use {_ALTERNATIVES}") from exc


def _from_disk(datasets: Any, arg: str, roots: Sequence[Path] | None = None) -> Any:
    path = Path(arg).expanduser()
    if not arg or not path.is_dir():
        raise DatasetError(f"hf-disk: path is not a folder: '{path}'. Give a folder written by save_to_disk, or "
                           "use hf-files:PATH for parquet or image files")
    check_saved_dataset(path, roots)  # state.json names only regular files inside the folder
    try:
        return datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"{path} is not a save_to_disk folder ({_first_line(exc)}): write it with "
                           "Dataset.save_to_disk or DatasetDict.save_to_disk, or use hf-files:PATH") from exc


def _from_files(datasets: Any, arg: str, roots: Sequence[Path] | None = None) -> Any:
    path = Path(arg).expanduser()
    check_inside(path, roots, f"hf-files: {path.name}")
    parquet = [path] if path.suffix.lower() == ".parquet" else sorted(path.rglob("*.parquet")) if path.is_dir() else []
    for part in parquet:  # read by pyarrow: never a FIFO, never outside the roots
        check_inside(part, roots, f"parquet file {part.name}")
        check_regular(part, f"parquet file {part}")
    if arg and path.is_file() and path.suffix.lower() == ".parquet":
        how: tuple[str, dict] = ("parquet", {"data_files": {"train": str(path)}})
    elif arg and path.is_dir() and parquet:
        how = ("parquet", {"data_dir": str(path)})
    elif arg and path.is_dir() and any(p.suffix.lower() in IMG_EXTENSIONS for p in path.rglob("*")):
        how = ("imagefolder", {"data_dir": str(path)})
    else:
        raise DatasetError(f"hf-files: found no parquet files or images at '{path}': give a .parquet file, a "
                           "folder of parquet files, or an imagefolder tree (<split>/<class>/<image>); a folder "
                           "written by save_to_disk is hf-disk:PATH")
    try:
        return datasets.load_dataset(how[0], **how[1])
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"cannot load {path} as {how[0]} files ({_first_line(exc)}): check the files, "
                           "or use folder:PATH for class folders of images") from exc


def _pick(features: dict, named: str | None, fits: Any, what: str, option: str, spec: str) -> str:
    """The column named `named`, else the one column where `fits(name, feature)`; raises a one-line DatasetError."""
    listing = ", ".join(f"{c} ({type(f).__name__})" for c, f in features.items())
    if named is not None:
        if named not in features:
            raise DatasetError(f"no column '{named}' in {spec}: its columns are {listing}")
        return named
    found = [c for c, f in features.items() if fits(c, f)]
    if len(found) != 1:
        which = f"several {what} columns ({', '.join(found)})" if found else f"no {what} column"
        raise DatasetError(f"{spec} has {which}; its columns are {listing}: name the one to use with {option}")
    return found[0]


def _is_plain_label(datasets: Any, feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and (feature.dtype.startswith(("int", "uint")) or
                                                    feature.dtype in ("string", "large_string"))


def _label_names(datasets: Any, table: Any, column: str, spec: str, split: str) -> list[Any]:
    """The label of each row as a class name (ClassLabel) or a raw int / str value; None where there is none."""
    feature = table.features[column]
    values = table.with_format("arrow")[column].to_pylist()  # the one column, without decoding any image
    if isinstance(feature, datasets.ClassLabel):
        bad = next((i for i, v in enumerate(values) if v is not None and v >= len(feature.names)), None)
        if bad is not None:
            raise DatasetError(f"row {bad} of {spec} ({split}) has label {values[bad]} in column '{column}', whose "
                               f"ClassLabel has {len(feature.names)} names: fix the row's label or the names")
        return [feature.names[v] if v is not None and v >= 0 else None for v in values]
    if not _is_plain_label(datasets, feature):
        raise DatasetError(f"label column '{column}' of {spec} ({split}) holds {feature}: give a ClassLabel, int or "
                           f"string column with {param('label_column')}")
    return values


def _columns(datasets: Any, features: dict, image_column: str | None, label_column: str | None,
             spec: str) -> tuple[str, str]:
    img = _pick(features, image_column, lambda c, f: isinstance(f, datasets.Image), "image", param("image_column"),
                spec)
    if label_column is not None or any(isinstance(f, datasets.ClassLabel) for f in features.values()):
        return img, _pick(features, label_column, lambda c, f: isinstance(f, datasets.ClassLabel), "ClassLabel",
                          param("label_column"), spec)
    return img, _pick(features, None, lambda c, f: c != img and _is_plain_label(datasets, f), "int or string label",
                      param("label_column"), spec)  # no ClassLabel: the one int or string column besides the images


def _with_images(datasets: Any, parts: dict, img_col: str, lab_col: str, spec: str) -> dict:
    """The splits that have both columns, each with its image column decoded as PIL images."""
    out = {}
    for s, table in parts.items():
        missing = [c for c in (img_col, lab_col) if c not in table.features]
        if missing:  # never train: its columns were picked from its own features
            _log.warning("%s: the %s split lacks column(s) %s and is not used", spec, s, missing)
            continue
        feature = table.features[img_col]
        try:  # undecoded: HFImages decodes each cell itself, so a path is checked and a URL never fetched
            out[s] = table.cast_column(img_col, datasets.Image(decode=False))
        except Exception as exc:  # noqa: BLE001 - any failed cast means the column is not images
            raise DatasetError(f"column '{img_col}' of {spec} does not hold images ({feature}): name the image "
                               f"column with {param('image_column')}") from exc
    return out


def _classes(datasets: Any, feature: Any, names: dict[str, list[Any]], spec: str) -> list[Any]:
    """The train split's ClassLabel names, else the sorted distinct labels of all splits."""
    found = {n for labels in names.values() for n in labels if n is not None}
    if not isinstance(feature, datasets.ClassLabel):
        return sorted(found, key=lambda v: (isinstance(v, str), v))
    extra = sorted(str(n) for n in found - set(feature.names))
    if extra:
        raise DatasetError(f"{spec} has labels {extra[:10]} outside the train split's classes: give every split the "
                           "same ClassLabel names")
    return list(feature.names)


def load_hf(spec: str, *, image_column: str | None = None, label_column: str | None = None,
            roots: Sequence[Path] | None = None) -> tuple[_Splits, list[int] | None]:
    """Load an ``hf:``, ``hf-disk:`` or ``hf-files:`` spec as adaptkit's splits.

    Args:
        spec: ``hf:NAME[:CONFIG]`` (the hub, cached by datasets), ``hf-disk:PATH`` (a save_to_disk folder) or
            ``hf-files:PATH`` (a .parquet file, a folder of parquet files or an imagefolder tree).
        image_column: the column of images; default the one ``datasets.Image`` column.
        label_column: the column of labels; default the one ``ClassLabel`` column, else the one int or string
            column (class names then are its sorted distinct values).
        roots: read no file outside these folders (the page's data roots; see :mod:`adaptkit.data.confine`).

    Returns:
        ``(classes, train source, train indices, test source, test indices)`` and the indices into the train source
        of the data set's own validation split (rows after the train split's), or None where it has none.
    """
    try:
        import datasets
    except ImportError:
        raise DatasetError("Hugging Face data sets need the hf extra: pip install 'adaptkit[hf]'") from None
    kind, _, arg = spec.strip().partition(":")
    if kind.lower() == "hf" and roots is not None:
        raise DatasetError("this page trains from the data roots only: hf:NAME data sets are trained on the command "
                           "line (adaptkit train --dataset hf:NAME)")
    loader = {"hf": _from_hub, "hf-disk": _from_disk, "hf-files": _from_files}[kind.lower()]
    with _bars_at_a_terminal(datasets):
        loaded = loader(datasets, arg.strip()) if roots is None else loader(datasets, arg.strip(), roots)
    splits = {str(k).lower(): v for k, v in loaded.items()} if isinstance(loaded, dict) else {"train": loaded}
    if "train" not in splits:
        raise DatasetError(f"{spec} has no train split (its splits: {', '.join(splits) or 'none'}): name one "
                           "'train', e.g. with DatasetDict(train=...)")
    img_col, lab_col = _columns(datasets, splits["train"].features, image_column, label_column, spec)
    val_name = next((v for v in VAL_SPLITS if v in splits), None)
    parts = {s: splits[k] for s, k in (("train", "train"), ("val", val_name), ("test", "test")) if k in splits}
    with _bars_at_a_terminal(datasets):
        parts = _with_images(datasets, parts, img_col, lab_col, spec)
    for s, table in parts.items():  # images named by path: never a URL, never outside the roots
        check_image_refs(_image_refs(table, img_col), roots, f"the {s} split of {spec}")
    names = {s: _label_names(datasets, t, lab_col, spec, s) for s, t in parts.items()}
    classes = _classes(datasets, parts["train"].features[lab_col], names, spec)
    index = {c: i for i, c in enumerate(classes)}
    sources = {s: HFImages(parts[s], img_col, [-1 if n is None else index[n] for n in names[s]],
                           f"the {s} split of {spec}") for s in parts}
    labelled = {s: [i for i, t in enumerate(src.targets) if t >= 0] for s, src in sources.items()}
    for s in [s for s in ("val", "test") if s in labelled and not labelled[s]]:
        _log.warning("%s: the %s split has no labels and is not used", spec, s)
        del sources[s], labelled[s]
    train_src, train_idx, val_idx = sources["train"], labelled["train"], None
    if "val" in sources:
        train_src = ConcatDataset([sources["train"], sources["val"]])
        val_idx = [len(sources["train"]) + i for i in labelled["val"]]
    classes = [str(c) for c in classes]
    if "test" in sources:
        return (classes, train_src, train_idx, sources["test"], labelled["test"]), val_idx
    keep, held = _split_by_class([sources["train"].targets[i] for i in train_idx], TEST_FRACTION, SPLIT_SEED)
    if not keep or not held:
        raise DatasetError(f"too few labelled rows in the train split of {spec} to split off a test split: add 2+ "
                           "per class, or a test split")
    return (classes, train_src, [train_idx[i] for i in keep], train_src, [train_idx[i] for i in held]), val_idx

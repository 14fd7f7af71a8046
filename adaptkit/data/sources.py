"""Data sets for adaptkit tasks: torchvision sets, image folders and a bundled offline set.

A spec string names the data (`cifar100`, `folder:PATH`, `digits`). Every split yields
`(tensor CxHxW, label)`: images become RGB with `to_rgb`, then go through timm's transforms built from the
backbone's data config, so training and prediction see the same input size and normalisation. Sources hold raw
PIL images; thin `TransformedSubset` views apply the transforms, so the validation split carved out of train
gets the eval transform. How each built-in set and image folder is read is in `adaptkit.data.loaders`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from adaptkit.data.loaders import (  # noqa: F401  (re-exported: adaptkit.data.hf and callers import them from here)
    _BY_FLAG,
    _BY_SPLIT,
    _TRAIN_AND_VAL,
    _TRAINVAL,
    DOWNLOAD_TIMEOUT_S,
    SPLIT_SEED,
    TEST_FRACTION,
    TORCHVISION_SETS,
    ImageFiles,
    _ArrayImages,
    _class_tree,
    _list_images,
    _load_digits,
    _load_folder,
    _load_torchvision,
    _samples,
    _split_by_class,
    _Splits,
    _TorchvisionSet,
)
from adaptkit.data.subsets import select_classes
from adaptkit.data.transforms import build_transform
from adaptkit.errors import DatasetError
from adaptkit.metadata import classes_problem
from adaptkit.suggest import did_you_mean

_log = logging.getLogger(__name__)


@dataclass
class DatasetInfo:
    """One row of `adaptkit datasets`."""

    name: str
    kind: str  # "torchvision" | "folder" | "bundled"
    num_classes: int | None
    description: str


@dataclass
class TaskData:
    """The three splits of one task and its class names (index = label)."""

    spec: str
    classes: list[str]
    train: Dataset
    val: Dataset
    test: Dataset

    @property
    def num_classes(self) -> int:
        return len(self.classes)



BUILTIN = "builtin:"
#: how a spec is read, for `adaptkit datasets` and the page
SPEC_RULE = ("A bare name is the built-in set even where a folder of that name exists; builtin:NAME says so "
             "explicitly, folder:PATH names your own images.")


def without_builtin(spec: str) -> str:
    """``spec`` without its ``builtin:`` prefix, if it has one (any case), stripped."""
    spec = spec.strip()
    return spec[len(BUILTIN):].strip() if spec.lower().startswith(BUILTIN) else spec


def builtin_name(spec: str) -> str | None:
    """The built-in set a spec names (``digits``, ``builtin:Fashion-MNIST`` -> ``fashion_mnist``), or None."""
    name = without_builtin(spec).lower().replace("-", "_")
    return name if name == "digits" or name in TORCHVISION_SETS else None


def list_datasets() -> list[DatasetInfo]:
    """Every data set spec adaptkit understands, torchvision sets first."""
    rows = [DatasetInfo(n, "torchvision", s.num_classes, s.description) for n, s in TORCHVISION_SETS.items()]
    rows.append(DatasetInfo("folder", "folder", None, "folder:PATH, a folder per class, or train/ + test/"))
    rows.append(DatasetInfo("digits", "bundled", 10, "scikit-learn 8x8 digits, 1797 images, works offline"))
    rows.append(DatasetInfo("hf", "huggingface", None, "hf:NAME[:CONFIG], a Hugging Face hub data set (cached)"))
    rows.append(DatasetInfo("hf-disk", "huggingface", None, "hf-disk:PATH, a datasets save_to_disk folder"))
    rows.append(DatasetInfo("hf-files", "huggingface", None, "hf-files:PATH, parquet files or an imagefolder tree"))
    return rows


def default_data_dir() -> Path:
    """Where torchvision sets live: `$ADAPTKIT_DATA_DIR`, else `~/.cache/adaptkit/data`."""
    env = os.environ.get("ADAPTKIT_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adaptkit" / "data"


class TransformedSubset(Dataset):
    """A view of `source[indices]` that applies `transform` to each image; the source is never modified."""

    def __init__(self, source: Dataset, indices: Sequence[int], transform: Callable | None) -> None:
        self.source, self.indices, self.transform = source, [int(i) for i in indices], transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img, label = self.source[self.indices[i]]
        return (self.transform(img) if self.transform else img), int(label)



def _shuffled(indices: list[int], seed: int) -> list[int]:
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).tolist()
    return [indices[i] for i in perm]


def _carve_val(train_idx: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random split of the train indices into (train, val), both in shuffled order."""
    n_val = round(val_fraction * len(train_idx))
    if val_fraction > 0 and len(train_idx) > 1:
        n_val = min(max(n_val, 1), len(train_idx) - 1)
    perm = _shuffled(train_idx, seed)
    return perm[n_val:], perm[:n_val]


def _unknown_dataset(spec: str) -> str:
    """Name the closest known data sets for a typo, and ``folder:`` / ``hf-disk:`` / ``hf-files:`` for a bare path."""
    path = Path(spec).expanduser()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return f"{spec} is a Hugging Face save_to_disk folder: write hf-disk:{spec}"
    if path.is_dir():
        return f"{spec} is a folder: write folder:{spec} to train on its class folders"
    if path.suffix.lower() == ".parquet" and path.is_file():
        return f"{spec} is a parquet file: write hf-files:{spec}"
    spec = without_builtin(spec)
    hint = did_you_mean(spec, [*TORCHVISION_SETS, "digits"])
    known = ", ".join([*TORCHVISION_SETS, "digits"])
    return (f"unknown data set '{spec}': {hint + ' ' if hint else ''}use one of {known}, or folder:PATH for your "
            "own images (one sub-folder per class), or a Hugging Face data set: hf:NAME[:CONFIG] from the hub, "
            "hf-disk:PATH (a save_to_disk folder) or hf-files:PATH (parquet files or an imagefolder tree)")


def load_task_data(spec: str, data_config: dict, *, data_dir: str | Path | None = None, download: bool = True,
                   val_fraction: float = 0.1, seed: int = 0, augment: str | bool = "light",
                   limit_train: int | None = None, limit_eval: int | None = None,
                   crop_scale: tuple[float, float] | None = None, flip: bool = False,
                   classes: str | Sequence[str] | None = None, image_column: str | None = None,
                   label_column: str | None = None, data_roots: Sequence[Path] | None = None) -> TaskData:
    """Load a data set by spec and split it into train / val / test with timm transforms.

    Args:
        spec: a built-in set (``digits``, a torchvision name; see `list_datasets`), ``builtin:NAME``,
            ``folder:PATH`` or a Hugging Face data set: ``hf:NAME[:CONFIG]`` (the hub, cached by datasets),
            ``hf-disk:PATH`` (a save_to_disk folder) or ``hf-files:PATH`` (a .parquet file, a folder of them or an
            imagefolder tree; see `adaptkit.data.hf`). A bare name is always the built-in set, whatever folders the
            working directory holds.
        data_config: the backbone's timm data config; sets input size and normalisation.
        data_dir: root of torchvision sets (each in `data_dir/<name>`); default `default_data_dir()`.
        download: let torchvision download a missing set.
        val_fraction: share of train carved out (seeded) as the validation split, in [0, 1); not used where an hf
            data set has a validation split (``validation``, ``valid`` or ``val``) of its own.
        seed: seeds the validation split and the `limit_*` subsets.
        augment: the training augmentation, ``none``, ``light`` or ``strong`` (see `build_transform`).
        limit_train: keep only this many (seeded random) training images.
        limit_eval: keep only this many (seeded random) images in each of val and test.
        crop_scale: area range of the training random resized crop (default: the level's).
        flip: random horizontal flips while training.
        classes: keep only these classes (`0-9`, `cat,dog` or a list of names; see `subsets.parse_classes`).
        image_column: the image column of an hf data set; default its one ``datasets.Image`` column.
        label_column: the label column of an hf data set; default its one ``ClassLabel`` column, else its one int or
            string column (class names then are the sorted distinct values).
        data_roots: read no file a data set names outside these folders (resolved; the web page's data roots):
            folder:, hf-disk: and hf-files: data sets are checked file by file (:mod:`adaptkit.data.confine`); the
            built-in sets and torchvision's (read from ``data_dir``, never from a path the spec names) are kept;
            an hf: set from the hub is refused.

    Returns:
        TaskData with class names and the three splits, each yielding (tensor C x H x W, int label).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for label, n in (("limit_train", limit_train), ("limit_eval", limit_eval)):
        if n is not None and n < 1:
            raise DatasetError(f"{label} must be at least 1 (or None for no limit), got {n}")
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"a data set spec must be a name such as digits or folder:PATH, got {spec!r}")
    from adaptkit.data.hf import HF_SPECS, load_hf  # cheap: datasets itself is imported only for an hf spec

    selection = classes  # `classes` names the data set's classes from here on
    key = spec.strip()
    name = builtin_name(key) or key.lower()
    own_val: list[int] | None = None  # indices into the train source of the data set's own validation split
    if (image_column is not None or label_column is not None) and not name.startswith(HF_SPECS):
        raise DatasetError(f"image_column and label_column apply to hf:, hf-disk: and hf-files: data sets, not {spec}")
    if data_roots is not None and name.startswith("hf:"):
        raise DatasetError(f"{spec} comes from the Hugging Face hub, which is not inside the data roots: train it on "
                           "the command line, or save it inside the data roots and give hf-disk:PATH")
    if name.startswith(HF_SPECS):
        (classes, train_src, train_idx, test_src, test_idx), own_val = load_hf(
            key, image_column=image_column, label_column=label_column, roots=data_roots)
    elif name.startswith("folder:"):
        classes, train_src, train_idx, test_src, test_idx = _load_folder(key[len("folder:"):].strip(), data_roots)
    elif name.startswith(BUILTIN):
        raise DatasetError(_unknown_dataset(spec))
    elif name == "digits":
        classes, train_src, train_idx, test_src, test_idx = _load_digits()
    elif name in TORCHVISION_SETS:
        root = (Path(data_dir).expanduser() if data_dir is not None else default_data_dir()) / name
        classes, train_src, train_idx, test_src, test_idx = _load_torchvision(name, root, download)
    else:
        raise DatasetError(_unknown_dataset(spec))
    if selection is not None:
        own = set(own_val or ())  # filtered with train (the same source), then taken apart again
        classes, train_src, kept, test_src, test_idx = select_classes(selection, classes, train_src,
                                                                      train_idx + (own_val or []), test_src, test_idx)
        train_idx = [i for i in kept if i not in own]
        own_val = None if own_val is None else [i for i in kept if i in own]
    problem = classes_problem([str(c) for c in classes])  # what a registry will accept, checked before training
    if problem:
        raise DatasetError(f"{spec}: {problem}: rename that class (folder) or pick other classes")
    if len(classes) < 2:
        raise DatasetError(f"{spec} has one class ({classes[0] if classes else 'none'}): a classifier needs two or "
                           "more, so add a folder of images for each other class")
    if own_val is None:
        fit_idx, val_idx = _carve_val(train_idx, val_fraction, seed)
    else:  # shuffled as _carve_val's are, so the limits below keep seeded random subsets
        fit_idx, val_idx = _shuffled(train_idx, seed), _shuffled(own_val, seed)
    if limit_eval is not None and limit_eval < len(test_idx):
        test_idx = sorted(_shuffled(test_idx, seed)[:limit_eval])
    fit_idx, val_idx = fit_idx[:limit_train], val_idx[:limit_eval]  # a slice [:None] keeps all
    train_tf = build_transform(data_config, train=True, augment=augment, crop_scale=crop_scale, flip=flip)
    eval_tf = build_transform(data_config, train=False)
    return TaskData(spec=spec, classes=classes, train=TransformedSubset(train_src, fit_idx, train_tf),
                    val=TransformedSubset(train_src, val_idx, eval_tf),
                    test=TransformedSubset(test_src, test_idx, eval_tf))

"""How each local data set is read into raw splits: torchvision sets (the table of those adaptkit knows), image
folders of class sub-folders and the bundled digits set, with the seeded stratified test split they share.

Each loader returns classes, a train source and indices, a test source and indices, of raw PIL images;
`adaptkit.data.sources` parses specs, carves the validation split and applies the transforms.
"""
from __future__ import annotations

import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from adaptkit.data.confine import check_inside
from adaptkit.data.images import IMG_EXTENSIONS
from adaptkit.errors import DatasetError

TEST_FRACTION = 0.2  # held out as test where a data set has no test split of its own
SPLIT_SEED = 0  # fixed, so the test split never depends on the training seed
DOWNLOAD_TIMEOUT_S = 30.0
# classes, train source and indices, test source and indices; an hf: source also returns its own val indices
_Splits = tuple[list[str], Dataset, list[int], Dataset, list[int]]


@dataclass(frozen=True)
class _TorchvisionSet:
    cls: str  # attribute of torchvision.datasets
    train: tuple[dict[str, Any], ...]  # kwargs of one or more splits, concatenated
    test: dict[str, Any] | None  # None: carve a seeded test split out of train
    num_classes: int
    description: str
    class_name: str = "class_{:03d}"  # where the data set has no `.classes`


_BY_FLAG = (({"train": True},), {"train": False})
_BY_SPLIT = (({"split": "train"},), {"split": "test"})
_TRAINVAL = (({"split": "trainval"},), {"split": "test"})
_TRAIN_AND_VAL = (({"split": "train"}, {"split": "val"}), {"split": "test"})
TORCHVISION_SETS: dict[str, _TorchvisionSet] = {
    "cifar10": _TorchvisionSet("CIFAR10", *_BY_FLAG, 10, "CIFAR-10, 32x32 objects"),
    "cifar100": _TorchvisionSet("CIFAR100", *_BY_FLAG, 100, "CIFAR-100, 32x32 objects"),
    "svhn": _TorchvisionSet("SVHN", *_BY_SPLIT, 10, "Street View house numbers", class_name="{}"),
    "food101": _TorchvisionSet("Food101", *_BY_SPLIT, 101, "Food-101 dishes"),
    "flowers102": _TorchvisionSet("Flowers102", *_TRAIN_AND_VAL, 102, "Oxford 102 flowers (train+val)"),
    "oxford_pets": _TorchvisionSet("OxfordIIITPet", *_TRAINVAL, 37, "Oxford-IIIT pet breeds"),
    "dtd": _TorchvisionSet("DTD", *_TRAIN_AND_VAL, 47, "Describable textures (train+val)"),
    "eurosat": _TorchvisionSet("EuroSAT", ({},), None, 10, "EuroSAT RGB land use (seeded 80/20 test split)"),
    "gtsrb": _TorchvisionSet("GTSRB", *_BY_SPLIT, 43, "German traffic signs"),
    "fgvc_aircraft": _TorchvisionSet("FGVCAircraft", *_TRAINVAL, 100, "FGVC aircraft variants"),
    "stl10": _TorchvisionSet("STL10", *_BY_SPLIT, 10, "STL-10, 96x96 objects"),
    "mnist": _TorchvisionSet("MNIST", *_BY_FLAG, 10, "MNIST handwritten digits"),
    "fashion_mnist": _TorchvisionSet("FashionMNIST", *_BY_FLAG, 10, "Fashion-MNIST clothing"),
}


class ImageFiles(Dataset):
    """(path, label) pairs read lazily with PIL; yields (PIL image, label)."""

    def __init__(self, samples: list[tuple[Path, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img.load()
                return img, label
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"cannot read image {path}: {exc}. Replace or delete this file.") from exc


class _ArrayImages(Dataset):
    """uint8 grey images (N, H, W) held in memory; yields (PIL 'L' image, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]), int(self.labels[i])  # uint8 (H, W) -> mode L


def _split_by_class(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified split: `fraction` of each class (at least 1 of 2 or more) goes to the second list."""
    labels_t = torch.as_tensor(list(labels))
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(labels_t).tolist():
        idx = torch.nonzero(labels_t == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)].tolist()
        n = max(round(fraction * len(idx)), 1 if len(idx) > 1 else 0)
        held += idx[:n]
        keep += idx[n:]
    return sorted(keep), sorted(held)


def _list_images(folder: Path) -> list[Path]:
    files = (p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    return sorted(p for p in files if p.is_file() and not p.name.startswith("."))


def _class_tree(root: Path) -> dict[str, list[Path]]:
    """Class folder name -> its images, checked; raises DatasetError with what to fix."""
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise DatasetError(f"no class folders in {root}: put each class's images in their own sub-folder, "
                           f"e.g. {root}/<class name>/<image>.jpg")
    tree = {d.name: _list_images(d) for d in dirs}
    empty = [name for name, files in tree.items() if not files]
    if empty:
        raise DatasetError(f"class folder(s) {empty} in {root} have no images ({', '.join(IMG_EXTENSIONS)}): "
                           "add images or remove the folder")
    return tree


def _samples(tree: dict[str, list[Path]], classes: list[str]) -> list[tuple[Path, int]]:
    return [(p, label) for label, c in enumerate(classes) for p in tree[c]]


def _confined(tree: dict[str, list[Path]], roots: Sequence[Path] | None, where: Path) -> dict[str, list[Path]]:
    """``tree`` unchanged if every image resolves inside ``roots`` (None: anywhere); else a DatasetError naming the
    class folder (a link or a linked image leads out), never where it leads."""
    for name, files in tree.items():
        for path in files:
            check_inside(path, roots, f"class folder {name!r} of {where.name} (or an image in it)")
    return tree


def _load_folder(path_str: str, roots: Sequence[Path] | None = None) -> _Splits:
    """Class folders under PATH, or under PATH/train and PATH/test (else PATH/val) when those exist; with ``roots``,
    every image must resolve inside them."""
    root = Path(path_str).expanduser()
    if not path_str or not root.is_dir():
        raise DatasetError(f"folder data set path does not exist or is not a folder: '{root}'. Give "
                           "folder:PATH with one sub-folder per class, or train/ and test/ of class folders")
    check_inside(root, roots, f"folder {root.name}")
    tree_root = root / "train" if (root / "train").is_dir() else root
    test_dir = next((d for d in (root / "test", root / "val") if d.is_dir()), None)
    tree = _confined(_class_tree(tree_root), roots, tree_root)
    classes = sorted(tree)
    source = ImageFiles(_samples(tree, classes))
    if tree_root != root and test_dir is not None:
        test_tree = _confined(_class_tree(test_dir), roots, test_dir)
        if set(tree) != set(test_tree):
            raise DatasetError(
                f"train/ and {test_dir.name}/ in {root} have different class folders: only in train: "
                f"{sorted(set(tree) - set(test_tree))}, only in {test_dir.name}: "
                f"{sorted(set(test_tree) - set(tree))}. Give both the same class folders")
        test_src = ImageFiles(_samples(test_tree, classes))
        return classes, source, list(range(len(source))), test_src, list(range(len(test_src)))
    train_idx, test_idx = _split_by_class([label for _, label in source.samples], TEST_FRACTION, SPLIT_SEED)
    if not train_idx or not test_idx:
        raise DatasetError(f"too few images in {tree_root} to split into train and test: add 2+ per class")
    return classes, source, train_idx, source, test_idx


def _load_digits() -> _Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 16 grey levels -> 0..255
    source = _ArrayImages(images, digits.target)
    train_idx, test_idx = _split_by_class(digits.target.tolist(), TEST_FRACTION, SPLIT_SEED)
    return [str(c) for c in digits.target_names], source, train_idx, source, test_idx


def _load_torchvision(name: str, root: Path, download: bool) -> _Splits:
    import torchvision.datasets

    spec = TORCHVISION_SETS[name]
    cls = getattr(torchvision.datasets, spec.cls)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a stalled download fails instead of hanging
    made = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)  # the top folder we create
    try:
        parts = [cls(root=str(root), download=download, **kw) for kw in spec.train]
        test_src = cls(root=str(root), download=download, **spec.test) if spec.test is not None else None
    except Exception as exc:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)  # a failed download leaves no empty or partial folder behind
        why = "the download failed" if download else "its files are not there and download=False"
        raise DatasetError(
            f"cannot load data set '{name}' from {root} ({why}: {exc}). To work offline, put the torchvision "
            f"files for '{name}' in {root} (copy them from a machine with network access, or run once with "
            "download enabled where there is network), or use a folder:PATH data set of class folders"
        ) from exc
    finally:
        socket.setdefaulttimeout(old_timeout)
    classes = getattr(parts[0], "classes", None)
    classes = classes or [spec.class_name.format(i) for i in range(spec.num_classes)]
    train_src = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    if test_src is None:
        labels = getattr(parts[0], "targets", None) or [parts[0][i][1] for i in range(len(parts[0]))]
        train_idx, test_idx = _split_by_class(labels, TEST_FRACTION, SPLIT_SEED)
        return list(classes), train_src, train_idx, train_src, test_idx
    return list(classes), train_src, list(range(len(train_src))), test_src, list(range(len(test_src)))

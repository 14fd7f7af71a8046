"""Tasks from a subset of a data set's classes, as class-incremental benchmarks split CIFAR-100 into tasks.

A selection is written as index ranges (``0-9``, ``0-4,7``) or class names (``cat,dog``), or given as a list of
names. The kept classes keep the data set's order for ranges and the given order for names; labels are renumbered
0..K-1 in that order, and the class names are the data set's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from adaptkit.errors import DatasetError

__all__ = ["parse_classes", "Relabelled", "labels_of"]


def parse_classes(selection: str | Sequence[str], classes: list[str]) -> list[int]:
    """Which of ``classes`` (by index, in the order kept) a selection names.

    Args:
        selection: ``"0-9"``, ``"0-4,7"``, ``"cat,dog"`` or a list of class names.
        classes: the data set's class names.

    Returns:
        Indices into ``classes``, without repeats, at least one.
    """
    items = [s.strip() for s in (selection.split(",") if isinstance(selection, str) else selection)]
    items = [s for s in items if s]
    if not items:
        raise DatasetError("empty class selection: give index ranges such as 0-9 or class names such as cat,dog")
    if all(_is_range(s) for s in items) and not set(items) <= set(classes):
        picked = [i for s in items for i in _expand(s, len(classes))]
    else:
        unknown = [s for s in items if s not in classes]
        if unknown:
            raise DatasetError(f"no class(es) {unknown} in this data set; its classes are "
                               f"{', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''} (or select by "
                               f"index, 0-{len(classes) - 1})")
        picked = [classes.index(s) for s in items]
    repeated = sorted({classes[i] for i in picked if picked.count(i) > 1})
    if repeated:
        raise DatasetError(f"class selection names {repeated} more than once: name each class once")
    return picked


def _is_range(item: str) -> bool:
    lo, sep, hi = item.partition("-")
    return lo.isdigit() and (not sep or hi.isdigit())


def _expand(item: str, n: int) -> list[int]:
    lo, sep, hi = item.partition("-")
    first, last = int(lo), int(hi) if sep else int(lo)
    if first > last or last >= n:
        raise DatasetError(f"class range {item!r} is out of bounds: this data set has classes 0-{n - 1}")
    return list(range(first, last + 1))


class Relabelled(Dataset):
    """``source`` with labels renumbered by ``mapping`` (old label -> new); samples of other labels never asked."""

    def __init__(self, source: Dataset, mapping: dict[int, int]) -> None:
        self.source, self.mapping = source, mapping

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img, label = self.source[i]
        return img, self.mapping[int(label)]


def labels_of(source: Dataset, indices: Sequence[int]) -> list[int]:
    """The labels of ``source[indices]``, read without decoding images where the data set allows it."""
    if isinstance(source, ConcatDataset):
        return [_concat_label(source, i) for i in indices]
    for attr in ("samples", "targets", "labels", "_labels"):
        values = getattr(source, attr, None)
        if values is not None and len(values) == len(source):  # type: ignore[arg-type]
            return [int(v[1] if attr == "samples" else v) for v in (values[i] for i in indices)]
    return [int(source[i][1]) for i in indices]


def _concat_label(source: ConcatDataset, i: int) -> int:
    import bisect

    part = bisect.bisect_right(source.cumulative_sizes, i)
    offset = i - (source.cumulative_sizes[part - 1] if part else 0)
    return labels_of(source.datasets[part], [offset])[0]


def select_classes(selection: str | Sequence[str], classes: list[str], train: Dataset, train_idx: list[int],
                   test: Dataset, test_idx: list[int]) -> tuple[list[str], Dataset, list[int], Dataset, list[int]]:
    """Keep only the selected classes of a data set's splits, labels renumbered 0..K-1 (see :func:`parse_classes`)."""
    picked = parse_classes(selection, classes)
    mapping = {old: new for new, old in enumerate(picked)}

    def keep(source: Dataset, indices: list[int]) -> list[int]:
        return [i for i, label in zip(indices, labels_of(source, indices), strict=True) if label in mapping]

    train_keep, test_keep = keep(train, train_idx), keep(test, test_idx)
    relabelled_train = Relabelled(train, mapping)
    relabelled_test = relabelled_train if test is train else Relabelled(test, mapping)
    return [classes[i] for i in picked], relabelled_train, train_keep, relabelled_test, test_keep

"""Train on cached frozen features: run the frozen part of the backbone once per image, not once per epoch.

A task's trainable tensors start at some block ``k`` (the head alone: ``k = depth``; ``--blocks K``: ``depth - K``).
Everything before block ``k`` is frozen, and when the training images are not augmented (the train transform is
the eval transform) its output for an image never changes. :func:`prepare` then runs that prefix once over the
train, val and test splits, keeps its outputs (in memory, or in a temporary file when they would not fit) and gives
back data sets of features with a module that runs only the rest: the blocks from ``k`` on, the final norm, the
pooling and the task's head. The steps, their order and the head are the same as without the cache.
When only the head trains (the linear probe), the same pass also keeps the mean patch tokens that the rejection
score reads (:mod:`adaptkit.inference.token_stats`) for the training images, so routing statistics need no pass of
their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adaptkit.inference.token_stats import tapped_blocks
from adaptkit.methods import TaskModel
from adaptkit.trunk import first_changed_block, run_prefix, run_suffix, splittable

__all__ = ["FeatureSet", "CachedTask", "first_trainable_block", "cache_start", "run_prefix", "run_suffix", "prepare",
           "frozen_pooled"]

_log = logging.getLogger(__name__)
MEMORY_SHARE = 0.25  # features larger than this share of the machine's memory go to a temporary file


def first_trainable_block(task: TaskModel) -> int:
    """The index of the first block that holds one of the task's trainable parts.

    Returns:
        ``depth`` when only the head trains (or parts after the last block), 0 when a part sits before the blocks
        or somewhere this function does not know (nothing can be cached then).
    """
    first = first_changed_block(task.parts, len(task.trunk.blocks))
    return 0 if first is None else first


def _deterministic(data: Any) -> bool:
    """True when the training images go through the eval transform (no augmentation): then they can be cached."""
    train_tf, eval_tf = getattr(data.train, "transform", None), getattr(data.val, "transform", None)
    return train_tf is not None and eval_tf is not None and repr(train_tf) == repr(eval_tf)


def cache_start(task: TaskModel, data: Any) -> int:
    """Where the cached prefix ends (a block index), or 0 when nothing can be cached for this task and data."""
    if not _deterministic(data) or any(p.requires_grad for p in task.trunk.patch_embed.parameters()):
        return 0
    start = first_trainable_block(task)
    if start < len(task.trunk.blocks) and not splittable(task.trunk):
        return 0  # a ViT variant with its own forward: only its pooled output (the linear probe) is cached
    return start


class FeatureSet(Dataset):
    """Cached features and their labels; ``features`` is a tensor or a memory-mapped array on disk; ``tokens`` the
    mean patch tokens of some blocks (block -> (N, d)), when kept."""

    def __init__(self, features: torch.Tensor | np.ndarray, labels: torch.Tensor, folder: Any = None,
                 tokens: dict[int, torch.Tensor] | None = None) -> None:
        self.features, self.labels, self.tokens = features, labels, tokens
        self._folder = folder  # a TemporaryDirectory kept alive as long as its memory map

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        f = self.features[i]
        return (torch.from_numpy(np.array(f)) if isinstance(f, np.ndarray) else f), int(self.labels[i])


class CachedTask(nn.Module):
    """A task run on cached features: the trunk from block ``start`` on, then the head."""

    def __init__(self, task: TaskModel, start: int) -> None:
        super().__init__()
        self.task, self.start = task, start

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.task.ctx.active = self.task.slot
        return self.task.head(run_suffix(self.task.trunk, h, self.start))

    def train(self, mode: bool = True) -> CachedTask:
        self.training = mode
        self.task.train(mode)  # reaches only what trains, as the task itself does
        return self


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


@torch.no_grad()
def _cache_split(task: TaskModel, split: Dataset, start: int, batch_size: int, workers: int, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager], blocks: tuple[int, ...] = ()
                 ) -> FeatureSet:
    loader = DataLoader(split, batch_size=batch_size, shuffle=False, num_workers=workers)
    n, store, labels, folder, at = len(split), None, torch.empty(len(split), dtype=torch.long), None, 0
    tokens: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
    task.ctx.active = task.slot
    for x, y in loader:
        taps = dict.fromkeys(blocks)
        with autocast():
            h = run_prefix(task.trunk, x.to(device, non_blocking=True), start, taps).float().cpu()
        for b in blocks:
            tokens[b].append(taps[b].float().cpu())
        if store is None:
            store, folder = _allocate(n, tuple(h.shape[1:]))
        store[at:at + len(y)] = h.numpy() if isinstance(store, np.ndarray) else h
        labels[at:at + len(y)] = y
        at += len(y)
    if store is None:
        store = torch.empty(0)
    return FeatureSet(store, labels, folder, {b: torch.cat(t) for b, t in tokens.items()} if blocks and at else None)


def _allocate(n: int, shape: tuple[int, ...]) -> tuple[torch.Tensor | np.ndarray, Any]:
    size = n * int(np.prod(shape)) * 4
    if size <= MEMORY_SHARE * _memory_bytes():
        return torch.empty((n, *shape), dtype=torch.float32), None
    folder = tempfile.TemporaryDirectory(prefix="adaptkit-features-")
    _log.info("caching %.1f GB of features in %s", size / 2**30, folder.name)
    return np.lib.format.open_memmap(os.path.join(folder.name, "features.npy"), "w+", np.float32, (n, *shape)), folder


def prepare(task: TaskModel, data: Any, *, batch_size: int, workers: int, device: torch.device,
            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
            enabled: bool = True) -> tuple[Any, nn.Module]:
    """Cache the frozen prefix's output over the three splits, where that is exact.

    Args:
        task: the task being trained (its trunk stays frozen before its first trainable block).
        data: a ``TaskData`` (train, val, test splits yielding (image tensor, label)).
        batch_size, workers: of the one pass over the images.
        device: where the prefix runs.
        autocast: the training loop's autocast, so cached features equal what an uncached step would compute.
        enabled: False returns ``data`` and ``task`` unchanged.

    Returns:
        ``(data, net)``: data sets of features and the module that maps them to logits; or the inputs unchanged
        when nothing can be cached (augmentation on, or a trainable part before the first block).
    """
    start = cache_start(task, data) if enabled else 0
    if start == 0:
        return data, task
    # the linear probe's pass is the bare backbone's: it keeps the training images' block tokens for routing
    blocks = tapped_blocks(task.trunk) if start == len(task.trunk.blocks) and not task.parts else ()
    splits = {name: _cache_split(task, getattr(data, name), start, batch_size, workers, device, autocast,
                                 blocks if name != "test" else ())
              for name in ("train", "val", "test")}
    _log.info("cached the frozen blocks 0-%d for %d images", start - 1, sum(len(s) for s in splits.values()))
    return dataclasses.replace(data, **splits), CachedTask(task, start)


def frozen_pooled(data: Any, net: nn.Module
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor] | None] | None:
    """The cached (features, labels, mean patch tokens per block or None) of the train then val split when they are
    the bare backbone's pooled features.

    That is when ``net`` runs only the head on them (a task with nothing in the trunk: the linear probe); then
    routing statistics need no second pass over the images. None otherwise.
    """
    if not isinstance(net, CachedTask) or net.start != len(net.task.trunk.blocks) or net.task.parts:
        return None
    splits = (data.train, data.val)
    tokens = None
    if all(s.tokens for s in splits):
        tokens = {b: torch.cat([s.tokens[b] for s in splits]) for b in splits[0].tokens}
    return torch.cat([torch.as_tensor(s.features) for s in splits]), torch.cat([s.labels for s in splits]), tokens

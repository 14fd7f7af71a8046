"""Routing statistics: what routing needs of a task's training images, collected once and kept in its adapter file.

Every version keeps, in its own adapter file, what a training-free classifier needs about its classes: the mean
frozen feature and the image count of each class and the within-class scatter of its images (the packed upper
triangle of a d x d matrix). They are a task's own, collected once from its training images, so adding a task never
changes another's, and a router over any set of tasks is rebuilt from them exactly, in any order (the classifiers:
:mod:`adaptkit.inference.router`).

"None of these tasks": a version also keeps how far its own images lie from their nearest class mean, under the
task's own within-class covariance (shrunk 1 % towards the identity): the percentiles (0, 1, ..., 100) of that
distance over its training images, each scored by statistics of the other images only (5-fold cross-fitting, at
most :data:`CALIBRATION_IMAGES` images scored). An image's *fit* to a task is the share of the task's own images
that lie farther out; routed prediction rejects an image whose chosen task fits it less than a stated false-rejection
rate (default 5 %: beyond the 95th percentile). The statistics are the task's alone, so the threshold never changes
when tasks are added; versions without the percentiles (trained before they existed) are never rejected.

Where the trunk can be split (:func:`adaptkit.trunk.splittable`), a version also keeps the same kind of score read on
the mean patch token of a few blocks, which tells broad photo tasks from other kinds of image far better
(:mod:`adaptkit.inference.token_stats`); when a version has it, its fit is read from it. Versions without it (older
files, other trunks) are scored on the pooled output as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from adaptkit.artifacts import ROUTING_PREFIX
from adaptkit.data import TaskData, TransformedSubset
from adaptkit.errors import ConfigError, step
from adaptkit.inference.token_stats import TokenCalibration, TokenStats, fit_from_quantiles, interp, tapped_blocks
from adaptkit.methods import task_context
from adaptkit.trunk import run_prefix

__all__ = ["ROUTING_PREFIX", "RoutingStats", "split_state", "frozen", "collect_stats", "accumulate_stats",
           "collect_task_stats", "task_stats_from_features", "Calibration", "DEFAULT_REJECT_RATE", "OOD_SHRINKAGE",
           "CALIBRATION_IMAGES", "Whitener", "check_reject_rate"]

DEFAULT_REJECT_RATE = 0.05  # routed prediction rejects an image less typical of its task than 95 % of the task's own
OOD_SHRINKAGE = 0.01  # share of the identity in a task's own covariance for its rejection score
CALIBRATION_IMAGES = 10_000  # at most this many training images are scored (seeded) for the percentiles
CALIBRATION_FOLDS = 5
MIN_CALIBRATION = 20  # fewer training images than this: no percentiles, the version is never rejected
PERCENTILES = 101  # 0, 1, ..., 100


@dataclass
class RoutingStats:
    """What routing keeps of one version's training images (frozen features of dimension d, C classes).

    Args:
        means: (C, d) mean feature per class.
        counts: (C,) images per class.
        scatter: (d, d) within-class scatter sum_c sum_i (x_i - mu_c)(x_i - mu_c)^T.
        ood_quantiles: (101,) percentiles 0..100 of the rejection score (:class:`Whitener`) of the task's own
            training images, each scored by the statistics of the other folds; None: never reject (older files).
        ood_shrinkage: the share of the identity in the covariance of that score.
        tokens: the rejection score on the blocks' tokens and its percentiles (None: score the pooled output).
    """

    means: torch.Tensor
    counts: torch.Tensor
    scatter: torch.Tensor
    ood_quantiles: torch.Tensor | None = None
    ood_shrinkage: float = OOD_SHRINKAGE
    tokens: TokenStats | None = None

    @property
    def calibrated(self) -> bool:
        """Whether images can be rejected: the version has the percentiles of its own images' scores."""
        return self.ood_quantiles is not None

    def threshold(self, reject_rate: float = DEFAULT_REJECT_RATE) -> float | None:
        """The score beyond which a share ``reject_rate`` of the task's own images lie (None: never reject)."""
        if self.ood_quantiles is None:
            return None
        q = self.ood_quantiles.double()
        return float(interp(torch.tensor([100 * (1 - reject_rate)]).double(),
                             torch.linspace(0, 100, len(q)).double(), q)[0])

    def fit(self, scores: torch.Tensor) -> torch.Tensor | None:
        """(B,) rejection scores -> (B,) the share of the task's own images that score higher (lie farther out)."""
        if self.ood_quantiles is None:
            return None
        return fit_from_quantiles(self.ood_quantiles, scores)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors written to the adapter file (the scatter as its packed upper triangle: half the bytes)."""
        rows, cols = torch.triu_indices(self.dim, self.dim)
        out = {f"{ROUTING_PREFIX}means": self.means.float().contiguous(),
               f"{ROUTING_PREFIX}counts": self.counts.long().contiguous(),
               f"{ROUTING_PREFIX}scatter": self.scatter[rows, cols].float().contiguous()}
        if self.ood_quantiles is not None:
            out[f"{ROUTING_PREFIX}ood_quantiles"] = self.ood_quantiles.float().contiguous()
            out[f"{ROUTING_PREFIX}ood_shrinkage"] = torch.tensor([float(self.ood_shrinkage)], dtype=torch.float64)
        if self.tokens is not None:
            out.update(self.tokens.to_tensors(ROUTING_PREFIX))
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> RoutingStats:
        means, counts = tensors[f"{ROUTING_PREFIX}means"].float(), tensors[f"{ROUTING_PREFIX}counts"].long()
        packed, d = tensors[f"{ROUTING_PREFIX}scatter"].float(), means.shape[1]
        if packed.numel() != d * (d + 1) // 2 or counts.shape != (means.shape[0],):
            raise ConfigError(f"routing statistics have inconsistent shapes: means {tuple(means.shape)}, counts "
                              f"{tuple(counts.shape)}, scatter {tuple(packed.shape)}")
        rows, cols = torch.triu_indices(d, d)
        scatter = torch.zeros(d, d, dtype=packed.dtype, device=packed.device)
        scatter[rows, cols] = packed
        scatter[cols, rows] = packed
        quantiles = tensors.get(f"{ROUTING_PREFIX}ood_quantiles")
        shrinkage = tensors.get(f"{ROUTING_PREFIX}ood_shrinkage")
        if quantiles is not None:
            quantiles = quantiles.float().flatten().cpu()
            if len(quantiles) < 2 or bool((quantiles.diff() < 0).any()) or shrinkage is None \
                    or shrinkage.numel() != 1 or not 0 < float(shrinkage) <= 1:
                raise ConfigError("routing statistics have bad rejection percentiles: refit them with "
                                  + step("routing_refit"))
        return cls(means=means, counts=counts, scatter=scatter, ood_quantiles=quantiles,
                   ood_shrinkage=float(shrinkage) if shrinkage is not None else OOD_SHRINKAGE,
                   tokens=TokenStats.from_tensors(tensors, ROUTING_PREFIX, d))


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], RoutingStats | None]:
    """An adapter file's tensors -> (the task's own tensors, its routing statistics or None)."""
    own = {k: v for k, v in state.items() if not k.startswith(ROUTING_PREFIX)}
    routing = {k: v for k, v in state.items() if k.startswith(ROUTING_PREFIX)}
    return own, RoutingStats.from_tensors(routing) if routing else None


@contextlib.contextmanager
def frozen(trunk: nn.Module) -> Iterator[nn.Module]:
    """Run ``trunk`` as the bare backbone: no task's modules active, whatever is attached to it."""
    with task_context(trunk).using():  # in this thread only: the others' passes keep their tasks
        yield trunk


@torch.inference_mode()
def collect_stats(trunk: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                  device: torch.device | str = "cpu", calibration: Calibration | None = None) -> RoutingStats:
    """One frozen pass over labelled batches -> the task's :class:`RoutingStats` (sums in float64).

    Args:
        trunk: the backbone (``num_classes=0``: it returns pooled features); attached tasks are switched off.
        batches: (images, labels) in the eval transform, e.g. a DataLoader over the training images.
        num_classes: the task's number of classes.
        device: where to run.
        calibration: also compute the rejection percentiles (see :class:`Calibration`).
    """
    blocks = tapped_blocks(trunk) if calibration is not None else ()

    def features(x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        taps = dict.fromkeys(blocks)
        return run_prefix(trunk, x.to(device), len(trunk.blocks), taps) if blocks else trunk(x.to(device)), taps

    with frozen(trunk):
        trunk.eval()
        return accumulate_stats(((f, y, taps) for x, y in batches for f, taps in [features(x)]), num_classes,
                                calibration, blocks=blocks)


def accumulate_stats(batches: Iterable[tuple], num_classes: int, calibration: Calibration | None = None,
                     blocks: tuple[int, ...] = ()) -> RoutingStats:
    """(frozen features (B, d), labels[, mean patch tokens per block]) batches -> :class:`RoutingStats`, summed in
    float64 in the batches' order; with ``calibration`` (built for as many images as the batches hold) the rejection
    percentiles too, and with ``blocks`` too (the batches' third item: block -> (B, d)) the token statistics
    (:mod:`adaptkit.inference.token_stats`)."""
    sums = counts = second = tokens = None
    if calibration is not None and blocks:
        tokens = TokenCalibration(calibration.total, num_classes, tuple(blocks))
    for f, y, *rest in batches:
        f = f.double().cpu()
        if sums is None:
            d = f.shape[1]
            sums, counts = torch.zeros(num_classes, d, dtype=torch.float64), torch.zeros(num_classes)
            second = torch.zeros(d, d, dtype=torch.float64)
        sums.index_add_(0, y.long(), f)
        counts.index_add_(0, y.long(), torch.ones(len(y)))
        second += f.T @ f
        if calibration is not None:
            calibration.add(f, y.long().cpu())
        if tokens is not None:
            tokens.add(rest[0], y)
    if sums is None:
        raise ConfigError("no images to collect routing statistics from")
    means = sums / counts.clamp(min=1)[:, None].double()
    scatter = second - (means.T * counts.double()) @ means  # sum x x^T - sum_c n_c mu_c mu_c^T
    stats = RoutingStats(means=means.float(), counts=counts.long(), scatter=scatter.float())
    if calibration is not None:
        stats.ood_quantiles, stats.ood_shrinkage = calibration.quantiles(), calibration.shrinkage
        stats.tokens = tokens.stats(MIN_CALIBRATION) if tokens is not None else None
    return stats


def check_reject_rate(rate: float) -> float:
    """The false-rejection rate of routed prediction: a share in (0, 1)."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < 1:
        raise ConfigError(f"the rejection rate is the share of a task's own images it may reject, in (0, 1): got "
                          f"{rate!r}")
    return float(rate)


@dataclass
class Whitener:
    """A task's rejection score from its own statistics: the squared Mahalanobis distance of a frozen feature to
    the task's nearest class mean, under its within-class covariance shrunk towards the identity (``shrinkage`` of
    the mean variance), computed as a Euclidean distance after whitening (stable in float32)."""

    center: torch.Tensor  # (d,) the task's mean feature
    weight: torch.Tensor  # (d, d): (x - center) @ weight is whitened
    means: torch.Tensor  # (C', d) whitened class means (classes with images only)

    @classmethod
    def of(cls, means: torch.Tensor, counts: torch.Tensor, scatter: torch.Tensor,
           shrinkage: float = OOD_SHRINKAGE) -> Whitener | None:
        """From a task's class means, counts and within-class scatter; None when there are too few images."""
        counts = counts.double()
        keep = counts > 0
        n, c = counts.sum().item(), int(keep.sum())
        if n - c < 1:
            return None
        means = means.double()
        cov = scatter.double() / (n - c)
        d = cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean().clamp(min=1e-12) * torch.eye(d).double()
        chol, info = torch.linalg.cholesky_ex(cov)
        if info.item():
            return None
        weight = torch.linalg.solve_triangular(chol, torch.eye(d).double(), upper=False).T  # L^-T
        center = (means[keep] * counts[keep, None]).sum(0) / n
        return cls(center=center.float(), weight=weight.float(), means=((means[keep] - center) @ weight).float())

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, d) frozen features -> (B,) squared Mahalanobis distance to the nearest class mean."""
        dt = self.weight.dtype
        z = (feats.to(self.weight.device, dt) - self.center) @ self.weight
        dist = torch.cdist(z, self.means, compute_mode="donot_use_mm_for_euclid_dist")
        return dist.min(dim=1).values.pow(2)

    def double(self) -> Whitener:
        return Whitener(self.center.double(), self.weight.double(), self.means.double())


class Calibration:
    """The rejection percentiles of a task, gathered beside its routing statistics in the same pass.

    Every image is given one of 5 folds (a seeded permutation of the images' order); the sums of each fold are
    kept, so each image is scored by the statistics of the other four folds: held out, as a new image would be.
    At most ``keep`` images (seeded) are scored; their scores' percentiles 0..100 are what the file stores.

    Args:
        total: how many images the batches will hold.
        num_classes: the task's number of classes.
    """

    def __init__(self, total: int, num_classes: int, *, folds: int = CALIBRATION_FOLDS,
                 keep: int = CALIBRATION_IMAGES, shrinkage: float = OOD_SHRINKAGE, seed: int = 0) -> None:
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
        self.total, self.num_classes, self.folds, self.shrinkage = total, num_classes, folds, shrinkage
        self.fold_of, self.kept = perm % folds, perm < keep
        self.seen = 0
        self.sums = self.counts = self.second = None
        self.feats: list[torch.Tensor] = []
        self.feat_folds: list[torch.Tensor] = []

    def add(self, f: torch.Tensor, y: torch.Tensor) -> None:
        """The next batch: (B, d) float64 features and (B,) labels, in the order of the statistics."""
        if self.seen + len(f) > self.total:
            raise ConfigError(f"calibration expected {self.total} images, got more")
        if self.sums is None:
            d = f.shape[1]
            self.sums = torch.zeros(self.folds, self.num_classes, d, dtype=torch.float64)
            self.counts = torch.zeros(self.folds, self.num_classes, dtype=torch.float64)
            self.second = torch.zeros(self.folds, d, d, dtype=torch.float64)
        fold = self.fold_of[self.seen:self.seen + len(f)]
        kept = self.kept[self.seen:self.seen + len(f)]
        self.seen += len(f)
        for k in fold.unique().tolist():
            rows = fold == k
            fk, yk = f[rows], y[rows]
            self.sums[k].index_add_(0, yk, fk)
            self.counts[k].index_add_(0, yk, torch.ones(len(yk), dtype=torch.float64))
            self.second[k] += fk.T @ fk
        self.feats.append(f[kept].float())
        self.feat_folds.append(fold[kept])

    def quantiles(self) -> torch.Tensor | None:
        """(101,) percentiles of the held-out scores; None when too few images (the version is never rejected)."""
        if self.seen != self.total:
            raise ConfigError(f"calibration expected {self.total} images, got {self.seen}")
        if self.sums is None or self.total < MIN_CALIBRATION:
            return None
        feats, folds = torch.cat(self.feats), torch.cat(self.feat_folds)
        sums, counts, second = self.sums.sum(0), self.counts.sum(0), self.second.sum(0)
        scores = torch.empty(len(feats), dtype=torch.float64)
        for k in range(self.folds):
            rows = folds == k
            if not rows.any():
                continue
            n = counts - self.counts[k]
            means = (sums - self.sums[k]) / n.clamp(min=1)[:, None]
            scatter = (second - self.second[k]) - (means.T * n) @ means
            whitener = Whitener.of(means, n, scatter, self.shrinkage)
            if whitener is None:
                return None
            scores[rows] = whitener.double().scores(feats[rows].double())
        return torch.quantile(scores, torch.linspace(0, 1, PERCENTILES).double()).float()


def _training_images(data: TaskData) -> list[int]:
    """A task's training images (train and validation) as sorted source indices: the order statistics are summed in."""
    return sorted([*data.train.indices, *data.val.indices])


def collect_task_stats(trunk: nn.Module, data: TaskData, device: torch.device | str = "cpu",
                       batch_size: int = 128, calibrate: bool = True) -> RoutingStats:
    """A task's :class:`RoutingStats` from all its training images (train and validation) in the eval transform,
    with the rejection percentiles unless ``calibrate`` is false."""
    images = TransformedSubset(data.val.source, _training_images(data), data.val.transform)
    loader = DataLoader(images, batch_size=batch_size, shuffle=False)
    calibration = Calibration(len(images), len(data.classes)) if calibrate else None
    return collect_stats(trunk, loader, len(data.classes), device, calibration)


def task_stats_from_features(data: TaskData, features: torch.Tensor, labels: torch.Tensor,
                             tokens: dict[int, torch.Tensor] | None = None, batch_size: int = 128,
                             calibrate: bool = True) -> RoutingStats:
    """:func:`collect_task_stats` from frozen features already computed, with no pass over the images.

    Args:
        data: the task's image splits (their indices say which image each feature belongs to).
        features: (N, d) the bare backbone's pooled features of ``data.train`` then ``data.val``, in their order,
            in the eval transform.
        labels: (N,) their labels.
        tokens: the mean patch tokens of :func:`tapped_blocks` (block -> (N, d)) of the same images, in their
            order; None: no token statistics (the version is scored on the pooled output).
        batch_size: as for :func:`collect_task_stats`: the same images summed in the same order and batches.
        calibrate: also compute the rejection percentiles (as :func:`collect_task_stats` does).
    """
    indices = [*data.train.indices, *data.val.indices]
    if len(indices) != len(features) or len(features) != len(labels):
        raise ConfigError(f"{len(features)} features and {len(labels)} labels for {len(indices)} training images")
    order = torch.tensor(sorted(range(len(indices)), key=indices.__getitem__))
    batches = (order[i:i + batch_size] for i in range(0, len(order), batch_size))
    calibration = Calibration(len(order), len(data.classes)) if calibrate else None
    tokens = tokens or {}
    return accumulate_stats(((features[rows], labels[rows], {b: t[rows] for b, t in tokens.items()})
                             for rows in batches), len(data.classes), calibration, blocks=tuple(sorted(tokens)))

"""Routing: pick an image's task with no task name, from statistics of frozen-backbone features.

Every version keeps, in its own adapter file, what a training-free classifier needs about its classes: the mean
frozen feature and the image count of each class and the within-class scatter of its images (the packed upper
triangle of a d x d matrix). They are a task's own, collected once from its training images, so adding a task never
changes another's, and a router over any set of tasks is rebuilt from them exactly, in any order:

- ``lda`` (default): linear discriminant analysis with one covariance pooled over every class of every task, shrunk
  towards a multiple of the identity (a shared-covariance Gaussian classifier; what RanPAC's ridge solves in a random
  feature space, here in the backbone's own space);
- ``qda``: the same, but each task's classes under the task's own covariance (shrunk towards the pooled one);
- ``ridge``: a ridge regression onto one-hot targets from the same second-order statistics (RanPAC without the
  random projection);
- ``ncm``: cosine nearest class mean (SimpleCIL).

A task's routing score is the posterior mass of its classes. Tasks on different backbones are compared by how
typical the image is of each backbone's classes (its Mahalanobis distance to the nearest class mean, standardised).
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
from adaptkit.errors import ConfigError
from adaptkit.methods import task_context

__all__ = ["ROUTING_PREFIX", "ROUTERS", "RoutingStats", "Router", "Routes", "split_state", "frozen",
           "collect_stats", "accumulate_stats", "collect_task_stats", "task_stats_from_features"]

ROUTERS = ("lda", "qda", "ridge", "ncm")
DEFAULT_SHRINKAGE = 0.1  # share of the (scaled) identity mixed into the pooled covariance
_NCM_TEMPERATURE = 0.05  # cosine similarities -> probabilities


@dataclass
class RoutingStats:
    """What routing keeps of one version's training images (frozen features of dimension d, C classes).

    Args:
        means: (C, d) mean feature per class.
        counts: (C,) images per class.
        scatter: (d, d) within-class scatter sum_c sum_i (x_i - mu_c)(x_i - mu_c)^T.
    """

    means: torch.Tensor
    counts: torch.Tensor
    scatter: torch.Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors written to the adapter file (the scatter as its packed upper triangle: half the bytes)."""
        rows, cols = torch.triu_indices(self.dim, self.dim)
        return {f"{ROUTING_PREFIX}means": self.means.float().contiguous(),
                f"{ROUTING_PREFIX}counts": self.counts.long().contiguous(),
                f"{ROUTING_PREFIX}scatter": self.scatter[rows, cols].float().contiguous()}

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
        return cls(means=means, counts=counts, scatter=scatter)


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], RoutingStats | None]:
    """An adapter file's tensors -> (the task's own tensors, its routing statistics or None)."""
    own = {k: v for k, v in state.items() if not k.startswith(ROUTING_PREFIX)}
    routing = {k: v for k, v in state.items() if k.startswith(ROUTING_PREFIX)}
    return own, RoutingStats.from_tensors(routing) if routing else None


@contextlib.contextmanager
def frozen(trunk: nn.Module) -> Iterator[nn.Module]:
    """Run ``trunk`` as the bare backbone: no task's modules active, whatever is attached to it."""
    ctx = task_context(trunk)
    active, slots = ctx.active, ctx.sample_slots
    ctx.active, ctx.sample_slots = None, None
    try:
        yield trunk
    finally:
        ctx.active, ctx.sample_slots = active, slots


@torch.inference_mode()
def collect_stats(trunk: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                  device: torch.device | str = "cpu") -> RoutingStats:
    """One frozen pass over labelled batches -> the task's :class:`RoutingStats` (sums in float64).

    Args:
        trunk: the backbone (``num_classes=0``: it returns pooled features); attached tasks are switched off.
        batches: (images, labels) in the eval transform, e.g. a DataLoader over the training images.
        num_classes: the task's number of classes.
        device: where to run.
    """
    with frozen(trunk):
        trunk.eval()
        return accumulate_stats(((trunk(x.to(device)), y) for x, y in batches), num_classes)


def accumulate_stats(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> RoutingStats:
    """(frozen features (B, d), labels) batches -> :class:`RoutingStats`, summed in float64 in the batches' order."""
    sums = counts = second = None
    for f, y in batches:
        f = f.double().cpu()
        if sums is None:
            d = f.shape[1]
            sums, counts = torch.zeros(num_classes, d, dtype=torch.float64), torch.zeros(num_classes)
            second = torch.zeros(d, d, dtype=torch.float64)
        sums.index_add_(0, y.long(), f)
        counts.index_add_(0, y.long(), torch.ones(len(y)))
        second += f.T @ f
    if sums is None:
        raise ConfigError("no images to collect routing statistics from")
    means = sums / counts.clamp(min=1)[:, None].double()
    scatter = second - (means.T * counts.double()) @ means  # sum x x^T - sum_c n_c mu_c mu_c^T
    return RoutingStats(means=means.float(), counts=counts.long(), scatter=scatter.float())


@dataclass
class Routes:
    """A router's answer for a batch of B images over its T tasks."""

    task_probs: torch.Tensor  # (B, T) posterior mass of each task's classes
    class_probs: torch.Tensor  # (B, C) posterior over every class of every task
    typicality: torch.Tensor  # (B,) standardised distance to the nearest class mean; lower is more typical

    def ranked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the best two tasks, (B, 2); with one task the runner-up is itself at 0."""
        k = min(2, self.task_probs.shape[1])
        values, indices = self.task_probs.topk(k, dim=1)
        if k == 1:
            values, indices = torch.cat([values, values * 0], 1), torch.cat([indices, indices], 1)
        return values, indices


class Router:
    """A training-free classifier over every class of the given tasks (one backbone), built from their stats.

    Args:
        stats: one :class:`RoutingStats` per task, in task order.
        kind: ``lda`` (default), ``qda``, ``ridge`` or ``ncm``.
        shrinkage: for ``lda`` the share of the identity in the covariance (``qda``: also the share of the pooled
            covariance in each task's); for ``ridge`` lambda relative to the
            mean eigenvalue of the features' second moment.
    """

    def __init__(self, stats: list[RoutingStats], kind: str = "lda", shrinkage: float = DEFAULT_SHRINKAGE) -> None:
        if kind not in ROUTERS:
            raise ConfigError(f"unknown router {kind!r}: use one of {', '.join(ROUTERS)}")
        if not stats:
            raise ConfigError("a router needs at least one task")
        if len({s.dim for s in stats}) > 1:
            raise ConfigError("tasks of one router must share a backbone (their features differ in size)")
        self.kind = kind
        means = torch.cat([s.means for s in stats]).double()  # (C, d)
        counts = torch.cat([s.counts for s in stats]).double()
        self.task_of_class = torch.cat([torch.full((len(s.counts),), t) for t, s in enumerate(stats)])
        self.num_tasks = len(stats)
        d = means.shape[1]
        scatter = sum(s.scatter.double() for s in stats)
        cov = scatter / max(counts.sum().item() - len(counts), 1.0)
        cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean().clamp(min=1e-12) * torch.eye(d).double()
        self.precision = torch.linalg.inv(cov)  # (d, d), for lda and the typicality of every kind
        self.means = means
        if kind == "lda":
            self.weight = self.precision @ means.T  # (d, C)
            self.bias = -0.5 * (means @ self.weight).diagonal()
        elif kind == "ridge":
            gram = scatter + (means.T * counts) @ means  # sum x x^T over every image
            lam = max(shrinkage, 1e-6) * gram.diagonal().mean()
            self.weight = torch.linalg.solve(gram + lam * torch.eye(d).double(), means.T * counts)
            self.bias = torch.zeros(len(counts)).double()
        elif kind == "qda":
            self.task_precisions = [self._task_precision(s, cov, shrinkage) for s in stats]
            self.weight, self.bias = torch.zeros(d, 0).double(), torch.zeros(0).double()
        else:
            self.weight = nn.functional.normalize(means, dim=1).T
            self.bias = torch.zeros(len(counts)).double()
        self.weight, self.bias, self.precision = self.weight.float(), self.bias.float(), self.precision.float()
        self.means = self.means.float()
        self._mu_p_mu = ((self.means @ self.precision) * self.means).sum(1)  # (C,)

    @staticmethod
    def _task_precision(s: RoutingStats, pooled: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, float]:
        """A task's own covariance shrunk towards the pooled one -> (its precision, half its log-determinant)."""
        own = s.scatter.double() / max(s.counts.sum().item() - len(s.counts), 1.0)
        cov = (1 - shrinkage) * own + shrinkage * pooled
        return torch.linalg.inv(cov).float(), 0.5 * torch.linalg.slogdet(cov).logabsdet.item()

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, d) frozen features -> (B, C) class scores (log-posteriors up to a constant for ``lda``, ``qda``)."""
        f = feats.float().to(self.weight.device)
        if self.kind == "qda":  # Gaussian log-likelihood under each task's own covariance
            out = []
            for t, (prec, half_logdet) in enumerate(self.task_precisions):
                diff = f[:, None, :] - self.means[self.task_of_class == t][None]  # (B, C_t, d)
                out.append(-0.5 * torch.einsum("bcd,de,bce->bc", diff, prec, diff) - half_logdet)
            return torch.cat(out, dim=1)
        if self.kind == "ncm":
            return nn.functional.normalize(f, dim=1) @ self.weight / _NCM_TEMPERATURE
        return f @ self.weight + self.bias

    def route(self, feats: torch.Tensor) -> Routes:
        """(B, d) frozen features -> the posterior over tasks and classes, and the images' typicality."""
        f = feats.float().to(self.weight.device)
        class_probs = self.scores(f).softmax(dim=1)
        task_probs = torch.zeros(len(f), self.num_tasks).index_add_(1, self.task_of_class, class_probs)
        if self.num_tasks == 1:
            task_probs.fill_(1.0)  # exactly, not a float sum that comes out at 0.9999999
        fp = f @ self.precision
        maha = ((fp * f).sum(1, keepdim=True) - 2 * fp @ self.means.T + self._mu_p_mu).min(dim=1).values
        d = f.shape[1]
        return Routes(task_probs=task_probs, class_probs=class_probs, typicality=(maha - d) / (2 * d) ** 0.5)


def _training_images(data: TaskData) -> list[int]:
    """A task's training images (train and validation) as sorted source indices: the order statistics are summed in."""
    return sorted([*data.train.indices, *data.val.indices])


def collect_task_stats(trunk: nn.Module, data: TaskData, device: torch.device | str = "cpu",
                       batch_size: int = 128) -> RoutingStats:
    """A task's :class:`RoutingStats` from all its training images (train and validation) in the eval transform."""
    images = TransformedSubset(data.val.source, _training_images(data), data.val.transform)
    loader = DataLoader(images, batch_size=batch_size, shuffle=False)
    return collect_stats(trunk, loader, len(data.classes), device)


def task_stats_from_features(data: TaskData, features: torch.Tensor, labels: torch.Tensor,
                             batch_size: int = 128) -> RoutingStats:
    """:func:`collect_task_stats` from frozen features already computed, with no pass over the images.

    Args:
        data: the task's image splits (their indices say which image each feature belongs to).
        features: (N, d) the bare backbone's pooled features of ``data.train`` then ``data.val``, in their order,
            in the eval transform.
        labels: (N,) their labels.
        batch_size: as for :func:`collect_task_stats`: the same images summed in the same order and batches.
    """
    indices = [*data.train.indices, *data.val.indices]
    if len(indices) != len(features) or len(features) != len(labels):
        raise ConfigError(f"{len(features)} features and {len(labels)} labels for {len(indices)} training images")
    order = torch.tensor(sorted(range(len(indices)), key=indices.__getitem__))
    batches = (order[i:i + batch_size] for i in range(0, len(order), batch_size))
    return accumulate_stats(((features[rows], labels[rows]) for rows in batches), len(data.classes))

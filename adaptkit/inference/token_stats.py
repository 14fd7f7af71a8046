"""The rejection score read inside the backbone: how unlike a task's own images an image is.

The pooled output of a backbone pretrained on photos puts many images of other kinds (drawings, noise, digits, grey
photos) inside a broad photo task's spread; the backbone's earlier places keep them apart. So a version also keeps,
for a few places (:func:`token_blocks`, a rule fixed here, not chosen per data set), a Gaussian per class of a
feature read there: the class means and the task's within-class covariance in a low-rank form (its leading
:data:`TOKEN_RANK` eigenvectors and eigenvalues, and one variance for every other direction: probabilistic PCA),
shrunk 1 % towards the mean variance as the pooled score is. The places: the spectrum of the image's patch
embeddings (:func:`adaptkit.trunk.patch_spectrum`, place :data:`~adaptkit.trunk.SPECTRUM`: how many colours and
how much detail the image has, which no mean token shows), the mean patch token after the last block of each quarter
of the trunk, and the pooled output.

At each place an image's distance to the task is its squared Mahalanobis distance to the nearest class mean,
calibrated as the pooled score is: the place keeps the percentiles 0..100 of the distances of the task's own
training images, each scored by the statistics of the other four folds, and an image's fit at the place is the share
of those images that lie farther out. The places' evidence is combined by the largest of these calibrated percentiles
(the smallest fit: an image unlike the task's own images at any place is unlike them), which is calibrated once more
on the same held-out images: the task keeps the percentiles of ``1 - min fit`` too, and an image's fit to the task is
the share of its own images whose smallest fit is smaller. (A sum of the places' distances, their log-likelihood,
lets the place with the worst-conditioned covariance outvote the others.) Files written before the spectrum keep
their places and are scored on them, as before.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from adaptkit.errors import ConfigError, step
from adaptkit.trunk import SPECTRUM, splittable

__all__ = ["TOKEN_RANK", "TOKEN_PREFIX", "token_blocks", "tapped_blocks", "TokenGaussian", "TokenStats",
           "TokenCalibration", "fit_from_quantiles", "interp"]

TOKEN_RANK = 64  # leading eigenvectors of a block's within-class covariance kept (the rest: one variance)
TOKEN_PREFIX = "tokens."  # under the routing prefix: tokens.<place>.<means|basis|var|rest>, tokens.quantiles
_PARTS = ("means", "basis", "var", "rest", "quantiles")


def token_blocks(depth: int) -> tuple[int, ...]:
    """The places the score reads: the spectrum of the patch embeddings (index :data:`~adaptkit.trunk.SPECTRUM`,
    -1), the mean patch token after the last block of each quarter of the trunk (0-based; depth 6: blocks 2, 3, 5,
    6 counted from 1; depth 12: 3, 6, 9, 12), and the pooled output (index ``depth``)."""
    return (SPECTRUM, *sorted({max(-(-depth * q // 4) - 1, 0) for q in range(1, 5)}), depth)


def tapped_blocks(trunk: torch.nn.Module) -> tuple[int, ...]:
    """:func:`token_blocks` of ``trunk``, or none where :mod:`adaptkit.trunk` cannot split it."""
    return token_blocks(len(trunk.blocks)) if splittable(trunk) and len(trunk.blocks) else ()


def fit_from_quantiles(quantiles: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B,) scores -> (B,) the share of the task's own images (percentiles ``quantiles``) that score higher."""
    q = quantiles.double()
    return 1 - interp(scores.double().cpu(), q, torch.linspace(0, 1, len(q)).double())


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``x`` on the increasing ``xp`` -> ``fp``, constant beyond the ends."""
    i = torch.searchsorted(xp.contiguous(), x.contiguous(), right=True).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    t = ((x - x0) / (x1 - x0).clamp(min=1e-300)).clamp(0, 1)
    return y0 + t * (y1 - y0)


@dataclass
class TokenGaussian:
    """One block's classes: means (C, d) under one covariance U diag(var) U^T + rest (I - U U^T), U = basis^T."""

    means: torch.Tensor  # (C, d); classes without images are left out
    basis: torch.Tensor  # (k, d) orthonormal rows: the leading eigenvectors
    var: torch.Tensor  # (k,) their variances
    rest: torch.Tensor  # (1,) the variance along every other direction
    quantiles: torch.Tensor  # (101,) percentiles of the task's own held-out images' :meth:`nearest`

    @classmethod
    def of(cls, means: torch.Tensor, counts: torch.Tensor, scatter: torch.Tensor, rank: int = TOKEN_RANK,
           shrinkage: float = 0.01) -> TokenGaussian | None:
        """From class means, counts and the within-class scatter (float64); None with too few images."""
        keep = counts > 0
        n, c = counts.sum().item(), int(keep.sum())
        if n - c < 1:
            return None
        lam, vecs = torch.linalg.eigh(scatter.double() / (n - c))
        lam, vecs = lam.flip(0).clamp(min=0), vecs.flip(1)
        lam = (1 - shrinkage) * lam + shrinkage * lam.mean().clamp(min=1e-12)
        k = min(rank, len(lam) - 1)
        return cls(means=means[keep].float(), basis=vecs[:, :k].T.float().contiguous(), var=lam[:k].float(),
                   rest=lam[k:].mean().reshape(1).float(), quantiles=torch.zeros(2))

    def distances(self, f: torch.Tensor) -> torch.Tensor:
        """(B, d) mean patch tokens -> (B, C) squared Mahalanobis distance to each class mean."""
        center, along_m, rest_m = self._classes
        f = f.to(self.means.dtype) - center  # centred first, so float32 keeps the digits that differ
        pf = f @ self.basis.T  # (B, k) along the leading directions
        exact = "donot_use_mm_for_euclid_dist"  # differences, not a sum of squares less a product: no cancellation
        along = torch.cdist(pf / self.var.sqrt(), along_m, compute_mode=exact)
        rest = torch.cdist(f - pf @ self.basis, rest_m, compute_mode=exact)  # the other directions
        return along.pow(2) + rest.pow(2) / self.rest

    @functools.cached_property
    def _classes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The centre, and the centred class means along the leading directions (scaled) and along the rest."""
        center = self.means.mean(0)
        means = self.means - center
        pm = means @ self.basis.T
        return center, pm / self.var.sqrt(), means - pm @ self.basis

    def nearest(self, f: torch.Tensor) -> torch.Tensor:
        """(B, d) mean patch tokens -> (B,) squared Mahalanobis distance to the nearest class mean."""
        return self.distances(f).min(dim=1).values

    def fit(self, f: torch.Tensor) -> torch.Tensor:
        """(B, d) mean patch tokens -> (B,) the share of the task's own images farther out at this block."""
        return fit_from_quantiles(self.quantiles, self.nearest(f))

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}{name}": getattr(self, name).float().contiguous() for name in _PARTS}


@dataclass
class TokenStats:
    """A version's token statistics: one :class:`TokenGaussian` per block of ``blocks``, and the percentiles of
    its own images' held-out scores."""

    blocks: tuple[int, ...]
    gaussians: list[TokenGaussian]
    quantiles: torch.Tensor  # (101,)

    def scores(self, taps: dict[int, torch.Tensor]) -> torch.Tensor:
        """Mean patch tokens per block (block -> (B, d)) -> (B,) the task's score, ``1 - min fit`` over its blocks
        (see the module's docstring)."""
        for b, g in zip(self.blocks, self.gaussians, strict=True):
            if taps[b].shape[-1] != g.means.shape[-1]:  # a spectrum of another length than this backbone's
                raise ConfigError(f"routing statistics were made for features of {g.means.shape[-1]} values at place "
                                  f"{b}, but this backbone gives {taps[b].shape[-1]}: refit them with "
                                  + step("routing_refit"))
        fits = torch.stack([g.fit(taps[b]) for b, g in zip(self.blocks, self.gaussians, strict=True)], 1)
        return 1 - fits.min(dim=1).values

    def fit(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) scores -> (B,) the share of the task's own images that score higher."""
        return fit_from_quantiles(self.quantiles, scores)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors written to the adapter file, under ``prefix`` (the routing prefix)."""
        out = {f"{prefix}{TOKEN_PREFIX}quantiles": self.quantiles.float().contiguous()}
        for b, g in zip(self.blocks, self.gaussians, strict=True):
            out.update(g.to_tensors(f"{prefix}{TOKEN_PREFIX}{b}."))
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, dim: int) -> TokenStats | None:
        """Read what :meth:`to_tensors` wrote (None when there is none: files written before it); ``dim``: the
        pooled features' size, which every block's must have (the spectrum's is its own)."""
        start = f"{prefix}{TOKEN_PREFIX}"
        mine = {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}
        if not mine:
            return None
        bad = ConfigError("routing statistics have bad token statistics: refit them with " + step("routing_refit"))
        blocks = sorted({int(k.split(".")[0]) for k in mine if k.split(".")[0].removeprefix("-").isdigit()})
        expected = {"quantiles", *(f"{b}.{p}" for b in blocks for p in _PARTS)}
        if not blocks or set(mine) != expected:
            raise bad
        quantiles = mine["quantiles"].float().flatten().cpu()
        gaussians = [TokenGaussian(**{p: mine[f"{b}.{p}"].float().cpu() for p in _PARTS}) for b in blocks]
        if blocks[0] < SPECTRUM:
            raise bad
        for b, g in zip(blocks, gaussians, strict=True):
            k, width = g.var.numel(), dim if b != SPECTRUM else g.means.shape[-1]
            if not 1 <= width <= dim:  # a spectrum has at most as many values as the features (patch_spectrum)
                raise bad
            if (g.means.dim() != 2 or g.means.shape[1] != width or g.basis.shape != (k, width) or g.rest.numel() != 1
                    or not bool((g.var > 0).all()) or not float(g.rest) > 0 or not _percentiles(g.quantiles)):
                raise bad
        if not _percentiles(quantiles):
            raise bad
        return cls(tuple(blocks), gaussians, quantiles)


def _percentiles(q: torch.Tensor) -> bool:
    return q.dim() == 1 and len(q) >= 2 and not bool((q.diff() < 0).any())


class TokenCalibration:
    """Token statistics of a task, gathered beside its pooled statistics in the same pass, and calibrated the same
    way (5 seeded folds, each image scored by the other four; at most ``keep`` images scored).

    Args:
        total: how many images the batches will hold.
        num_classes: the task's number of classes.
        blocks: the blocks to read (:func:`token_blocks`).
    """

    def __init__(self, total: int, num_classes: int, blocks: tuple[int, ...], *, folds: int = 5,
                 keep: int = 10_000, rank: int = TOKEN_RANK, shrinkage: float = 0.01, seed: int = 0) -> None:
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
        self.total, self.num_classes, self.blocks, self.folds = total, num_classes, blocks, folds
        self.rank, self.shrinkage = rank, shrinkage
        self.fold_of, self.kept = perm % folds, perm < keep
        self.seen = 0
        self.sums: dict[int, torch.Tensor] = {}
        self.second: dict[int, torch.Tensor] = {}
        self.counts = torch.zeros(folds, num_classes, dtype=torch.float64)
        self.feats: list[dict[int, torch.Tensor]] = []
        self.feat_folds: list[torch.Tensor] = []

    def add(self, taps: dict[int, torch.Tensor], y: torch.Tensor) -> None:
        """The next batch: mean patch tokens per block (block -> (B, d)) and (B,) labels."""
        n = len(y)
        if self.seen + n > self.total:
            raise ConfigError(f"calibration expected {self.total} images, got more")
        fold, kept = self.fold_of[self.seen:self.seen + n], self.kept[self.seen:self.seen + n]
        self.seen += n
        y = y.long().cpu()
        for b in self.blocks:
            f = taps[b].double().cpu()
            if b not in self.sums:
                d = f.shape[1]
                self.sums[b] = torch.zeros(self.folds, self.num_classes, d, dtype=torch.float64)
                self.second[b] = torch.zeros(self.folds, d, d, dtype=torch.float64)
            for k in fold.unique().tolist():
                rows = fold == k
                self.sums[b][k].index_add_(0, y[rows], f[rows])
                self.second[b][k] += f[rows].T @ f[rows]
        for k in fold.unique().tolist():
            self.counts[k].index_add_(0, y[fold == k], torch.ones(int((fold == k).sum()), dtype=torch.float64))
        self.feats.append({b: taps[b][kept].float().cpu() for b in self.blocks})
        self.feat_folds.append(fold[kept])

    def _gaussians(self, drop: int | None) -> list[TokenGaussian] | None:
        """The blocks' Gaussians from every fold but ``drop`` (None: from all)."""
        out = []
        for b in self.blocks:
            sums, counts, second = self.sums[b].sum(0), self.counts.sum(0), self.second[b].sum(0)
            if drop is not None:
                sums, counts, second = sums - self.sums[b][drop], counts - self.counts[drop], second - self.second[
                    b][drop]
            means = sums / counts.clamp(min=1)[:, None]
            g = TokenGaussian.of(means, counts, second - (means.T * counts) @ means, self.rank, self.shrinkage)
            if g is None:
                return None
            out.append(g)
        return out

    def stats(self, min_images: int = 20) -> TokenStats | None:
        """The token statistics and their held-out percentiles; None with fewer than ``min_images`` images."""
        if self.seen != self.total:
            raise ConfigError(f"calibration expected {self.total} images, got {self.seen}")
        if not self.sums or self.total < min_images:
            return None
        taps = {b: torch.cat([f[b] for f in self.feats]) for b in self.blocks}
        folds = torch.cat(self.feat_folds)
        held_out = torch.empty(len(folds), len(self.blocks), dtype=torch.float64)  # each block's distance
        for k in range(self.folds):
            rows = folds == k
            if not rows.any():
                continue
            gaussians = self._gaussians(k)
            if gaussians is None:
                return None
            held_out[rows] = torch.stack([g.nearest(taps[b][rows]) for b, g in zip(self.blocks, gaussians,
                                                                                     strict=True)], 1).double()
        gaussians = self._gaussians(None)
        if gaussians is None:
            return None
        for j, g in enumerate(gaussians):
            g.quantiles = _quantiles(held_out[:, j])
        self.held_out = held_out  # kept for benchmarks that compare ways to combine the blocks
        fits = torch.stack([fit_from_quantiles(g.quantiles, held_out[:, j]) for j, g in enumerate(gaussians)], 1)
        return TokenStats(self.blocks, gaussians, _quantiles(1 - fits.min(dim=1).values))


def _quantiles(scores: torch.Tensor) -> torch.Tensor:
    """(N,) scores -> (101,) their percentiles 0..100."""
    return torch.quantile(scores.double(), torch.linspace(0, 1, 101).double()).float()

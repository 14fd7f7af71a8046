"""The routing classifier: pick an image's task with no task name, from the tasks' routing statistics
(:mod:`adaptkit.inference.routing_stats`), rebuilt exactly from them for any set of tasks, in any order:

- ``qda`` (default): each task's classes are Gaussians under the task's own covariance, estimated the Bayesian
  way: an inverse-Wishart prior centred on the covariance pooled over the tasks, as strong as the task's own images
  say (its weight maximises their marginal likelihood: empirical Bayes, nothing tuned on a data set), and scored by
  the posterior predictive, a Student-t (so a task with few images is not over-sure of its spread). A task with many
  images and a spread unlike the others' (grey photos beside colour ones) keeps its own; one with few images, or
  like the others, falls back to the pooled one, which is ``lda``. Tasks trained on one data set (``groups``: its
  classes split into tasks) share one spread, estimated from all their images: their covariances differ only by
  the classes each drew, which is the case ``lda`` models;
- ``lda``: linear discriminant analysis with one covariance pooled over every class of every task, shrunk
  towards a multiple of the identity (a shared-covariance Gaussian classifier; what RanPAC's ridge solves in a random
  feature space, here in the backbone's own space). Best when the tasks are splits of one data set. The pooled
  covariance (``qda``'s prior too) is the mean of the tasks' own (each task weighs the same, whatever its number of
  images), its shrinkage is chosen from it by the oracle approximating shrinkage estimator (OAS, Chen et al. 2010),
  and every task has the same prior, shared equally by its classes (so a 20-class task does not outweigh a 2-class
  one);
- ``ridge``: a ridge regression onto one-hot targets from the same second-order statistics (RanPAC without the
  random projection);
- ``ncm``: cosine nearest class mean (SimpleCIL).

A task's routing score is the posterior mass of its classes. Tasks on different backbones are compared by how
typical the image is of each backbone's classes (its Mahalanobis distance to the nearest class mean, standardised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adaptkit.errors import ConfigError
from adaptkit.inference.routing_stats import RoutingStats, Whitener

__all__ = ["DEFAULT_ROUTER", "ROUTERS", "Router", "Routes", "oas_shrinkage", "DEFAULT_SHRINKAGE"]

ROUTERS = ("qda", "lda", "ridge", "ncm")
DEFAULT_ROUTER = "qda"
DEFAULT_SHRINKAGE = None  # share of the (scaled) identity in the pooled covariance; None: chosen from it (OAS)
_FIXED_SHRINKAGE = 0.1  # ridge's lambda when none is given
# qda: the prior's weight, a (in pooled-covariance units, a/d from 2^-8 to 2^12), picked from this grid
_PRIOR_GRID = 2.0 ** torch.arange(-8.0, 12.001, 0.125, dtype=torch.float64)
_NCM_TEMPERATURE = 0.05  # cosine similarities -> probabilities
UNCALIBRATED_FIT = 0.5  # routing weighs a version without percentiles as an image of median fit
FIT_FLOOR = 1e-3  # beyond every held-out image: the fit the routing weight does not go below


@dataclass
class Routes:
    """A router's answer for a batch of B images over its T tasks."""

    task_probs: torch.Tensor  # (B, T) posterior mass of each task's classes
    class_probs: torch.Tensor  # (B, C) posterior over every class of every task
    typicality: torch.Tensor  # (B,) standardised distance to the nearest class mean; lower is more typical
    fit: torch.Tensor | None = None  # (B, T) share of each task's own images farther out (NaN: not calibrated)

    def choose(self, reject_rate: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each image's task, its runner-up and whether no task fits it, (B,) each: the most probable task among
        those the image fits (``fit`` at least ``reject_rate``; a task without percentiles always fits); when it
        fits none, it is rejected and its task is the most probable one. ``reject_rate`` None: never rejected, the
        most probable task. The runner-up is the most probable other task (the task itself when there is one)."""
        probs = self.task_probs
        nearest = probs.argmax(1)
        if reject_rate is None or self.fit is None:
            accepts = torch.ones_like(probs, dtype=torch.bool)
        else:
            accepts = ~(self.fit < reject_rate)  # NaN (not calibrated) accepts
        fits_some = accepts.any(1)
        chosen = torch.where(fits_some, probs.masked_fill(~accepts, -1.0).argmax(1), nearest)
        if probs.shape[1] == 1:
            return chosen, chosen, ~fits_some
        runner = probs.scatter(1, chosen[:, None], -1.0).argmax(1)
        return chosen, runner, ~fits_some

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
        kind: ``qda`` (default), ``lda``, ``ridge`` or ``ncm``.
        shrinkage: for ``lda`` and ``qda`` the share of the identity in the pooled covariance, default (None)
            chosen by OAS; for ``ridge`` lambda relative to the mean eigenvalue of the features' second moment
            (default 0.1).
        prior: ``task`` (the default of ``lda`` and ``qda``): every task equally likely a priori, its classes
            sharing its prior equally; ``class``: every class equally likely (tasks with more classes weigh more).
            For ``lda`` and ``qda``.
        pooling: ``task`` (the default of ``lda`` and ``qda``): the pooled covariance is the mean of the tasks' own;
            ``images`` (the others' default): every image weighs the same, so a task with more images weighs more.
        groups: for ``qda``, one key per task (the data set it was trained on): tasks of one key share a covariance,
            estimated from their scatters together. None: every task its own.
        by_fit: weigh each task's posterior by how well the image fits the task's own held-out spread (its ``fit``,
            see :meth:`fit`; a version without percentiles counts as 0.5) and renormalise: a task whose
            classifier score is high only because its classes sit nearest, while the image lies beyond almost all
            its own images, loses to one it fits. (``shrinkage=0.1, prior="class", pooling="images",
            by_fit=False`` is ``lda`` as it was before issue 23.)
    """

    def __init__(self, stats: list[RoutingStats], kind: str = DEFAULT_ROUTER,
                 shrinkage: float | None = DEFAULT_SHRINKAGE, prior: str | None = None, pooling: str | None = None,
                 by_fit: bool = True, groups: list[str] | None = None) -> None:
        if kind not in ROUTERS:
            raise ConfigError(f"unknown router {kind!r}: use one of {', '.join(ROUTERS)}")
        if not stats:
            raise ConfigError("a router needs at least one task")
        if len({s.dim for s in stats}) > 1:
            raise ConfigError("tasks of one router must share a backbone (their features differ in size)")
        prior = prior or ("task" if kind in ("lda", "qda") else "class")
        pooling = pooling or ("task" if kind in ("lda", "qda") else "images")
        if groups is not None and len(groups) != len(stats):
            raise ConfigError(f"groups names {len(groups)} tasks, the router has {len(stats)}")
        if prior not in ("task", "class") or pooling not in ("task", "images"):
            raise ConfigError(f"unknown prior {prior!r} or pooling {pooling!r}: use task or class, task or images")
        self.kind, self.by_fit = kind, by_fit
        self.stats = stats
        self.whiteners = [Whitener.of(s.means, s.counts, s.scatter, s.ood_shrinkage) if s.calibrated else None
                          for s in stats]
        means = torch.cat([s.means for s in stats]).double()  # (C, d)
        counts = torch.cat([s.counts for s in stats]).double()
        self.task_of_class = torch.cat([torch.full((len(s.counts),), t) for t, s in enumerate(stats)])
        self.num_tasks = len(stats)
        d = means.shape[1]
        scatter = sum(s.scatter.double() for s in stats)
        cov, dof = _balanced_covariance(stats) if pooling == "task" else (
            scatter / max(counts.sum().item() - len(counts), 1.0), counts.sum().item() - len(counts))
        if shrinkage is None:
            shrinkage = oas_shrinkage(cov, dof) if kind != "ridge" else _FIXED_SHRINKAGE
        self.shrinkage = shrinkage
        cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean().clamp(min=1e-12) * torch.eye(d).double()
        self.precision = torch.linalg.inv(cov)  # (d, d), for lda and the typicality of every kind
        self.means = means
        # log prior of each class: uniform over tasks, then over the task's classes (or uniform over classes)
        self.log_prior = (-torch.cat([torch.full((len(s.counts),), float(len(s.counts))) for s in stats]).log()
                          if prior == "task" and kind in ("lda", "qda") else torch.zeros(len(counts))).double()
        if kind == "lda":
            self.weight = self.precision @ means.T  # (d, C)
            self.bias = -0.5 * (means @ self.weight).diagonal() + self.log_prior
        elif kind == "ridge":
            gram = scatter + (means.T * counts) @ means  # sum x x^T over every image
            lam = max(shrinkage, 1e-6) * gram.diagonal().mean()
            self.weight = torch.linalg.solve(gram + lam * torch.eye(d).double(), means.T * counts)
            self.bias = torch.zeros(len(counts)).double()
        elif kind == "qda":
            chol = torch.linalg.cholesky(cov)
            white = torch.linalg.solve_triangular(chol, torch.eye(d).double(), upper=False).T  # L^-T: x @ white
            keys = groups if groups is not None else [str(t) for t in range(len(stats))]
            members: dict[str, list[RoutingStats]] = {}
            for key, st in zip(keys, stats, strict=True):
                members.setdefault(key, []).append(st)
            spreads = {key: _Spread.of(sum(m.scatter.double() for m in group), sum(_dof(m) for m in group), white)
                       for key, group in members.items()}
            self.task_spreads = [spreads[key] for key in keys]  # one object per group, shared by its tasks
            self._spread_means = [(st.means.double() @ sp.proj.double()).float()  # (C_t, d) in its coordinates
                                  for sp, st in zip(self.task_spreads, stats, strict=True)]
            self.weight, self.bias = torch.zeros(d, 0).double(), torch.zeros(0).double()
        else:
            self.weight = nn.functional.normalize(means, dim=1).T
            self.bias = torch.zeros(len(counts)).double()
        self.weight, self.bias, self.precision = self.weight.float(), self.bias.float(), self.precision.float()
        self.means = self.means.float()
        self._mu_p_mu = ((self.means @ self.precision) * self.means).sum(1)  # (C,)

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, d) frozen features -> (B, C) class scores (log-posteriors up to a constant for ``lda``, ``qda``)."""
        f = feats.float().to(self.weight.device)
        if self.kind == "qda":  # each task's classes under its own predictive distribution
            projected: dict[int, torch.Tensor] = {}  # the features in each group's coordinates, once per group
            out = []
            for spread, means in zip(self.task_spreads, self._spread_means, strict=True):
                y = projected.get(id(spread))
                if y is None:
                    y = projected[id(spread)] = spread.project(f)
                out.append(spread.log_density(y, means))
            return torch.cat(out, dim=1) + self.log_prior.float()
        if self.kind == "ncm":
            return nn.functional.normalize(f, dim=1) @ self.weight / _NCM_TEMPERATURE
        return f @ self.weight + self.bias

    @property
    def blocks(self) -> tuple[int, ...]:
        """The blocks whose mean patch token the tasks' rejection scores read (see :meth:`fit`)."""
        return tuple(sorted({b for s in self.stats if s.tokens is not None for b in s.tokens.blocks}))

    def route(self, feats: torch.Tensor, taps: dict[int, torch.Tensor] | None = None) -> Routes:
        """(B, d) frozen features (and the mean patch tokens of :attr:`blocks`, block -> (B, d)) -> the posterior
        over tasks and classes, the images' typicality and their fit to each task."""
        f = feats.float().to(self.weight.device)
        class_probs = self.scores(f).softmax(dim=1)
        fit = self.fit(f, taps)
        if self.by_fit and self.num_tasks > 1 and bool((~fit.isnan()).any()):
            # posterior x fit: each class weighed by how well the image fits its task's held-out spread
            weight = fit.nan_to_num(UNCALIBRATED_FIT).clamp(min=FIT_FLOOR)[:, self.task_of_class]
            class_probs = class_probs * weight
            class_probs = class_probs / class_probs.sum(1, keepdim=True)
        task_probs = torch.zeros(len(f), self.num_tasks).index_add_(1, self.task_of_class, class_probs)
        task_probs.clamp_(max=1.0)  # a float sum can come out at 1.0000001
        if self.num_tasks == 1:
            task_probs.fill_(1.0)  # exactly, not a float sum that comes out at 0.9999999
        fp = f @ self.precision
        maha = ((fp * f).sum(1, keepdim=True) - 2 * fp @ self.means.T + self._mu_p_mu).min(dim=1).values
        d = f.shape[1]
        return Routes(task_probs=task_probs, class_probs=class_probs, typicality=(maha - d) / (2 * d) ** 0.5,
                      fit=fit)

    def ood_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, d) frozen features -> (B, T) each task's rejection score (see :class:`Whitener`; NaN: none)."""
        out = torch.full((len(feats), self.num_tasks), float("nan"))
        for t, w in enumerate(self.whiteners):
            if w is not None:
                out[:, t] = w.scores(feats).cpu()
        return out

    def fit(self, feats: torch.Tensor, taps: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, d) frozen features (and the mean patch tokens of :attr:`blocks`) -> (B, T): the share of each task's
        own images that lie farther out than the image (1: as typical as any, 0: farther than all), on the blocks'
        tokens where the task has their statistics and ``taps`` holds them, else on the pooled output; NaN for tasks
        without rejection percentiles."""
        out = torch.full((len(feats), self.num_tasks), float("nan"))
        for t, (s, w) in enumerate(zip(self.stats, self.whiteners, strict=True)):
            if s.tokens is not None and taps is not None and all(b in taps for b in s.tokens.blocks):
                out[:, t] = s.tokens.fit(s.tokens.scores(taps)).float()
            elif w is not None:
                out[:, t] = s.fit(w.scores(feats).cpu()).float()
        return out


@dataclass
class _Spread:
    """The covariance of a task's classes (or a group's: tasks of one data set) under ``qda``: the posterior
    predictive (a multivariate Student-t) of a Gaussian whose covariance has an inverse-Wishart prior with mean the
    pooled covariance P and ``a + d + 1`` degrees of freedom, after the task's within-class scatter S from n degrees
    of freedom (images less classes).
    In coordinates whitened by P the prior is a multiple of the identity, so one eigendecomposition of the whitened
    scatter (eigenvalues l_i) gives the marginal likelihood of the task's images for every a in closed form:

        log p(S | a) = log G_d((a + d + 1 + n) / 2) - log G_d((a + d + 1) / 2)
                       + (a + d + 1) / 2 * d log a - (a + d + 1 + n) / 2 * sum_i log(a + l_i) + const

    (G_d the multivariate gamma function). The a that maximises it over :data:`_PRIOR_GRID` is the prior's weight;
    the predictive then has nu = a + n + 2 degrees of freedom and scale (a + l_i) / nu along the eigenvectors (the
    pooled covariance's log-determinant, the same for every task, is left out of the scores)."""

    proj: torch.Tensor  # (d, d): features -> the task's eigen-coordinates, whitened by the pooled covariance
    inv_scale: torch.Tensor  # (d,) nu / (a + l_i)
    const: float  # log-normaliser of the Student-t less half the log-determinant of its scale
    nu: float
    prior_weight: float  # a / (a + n): the share of the pooled covariance in the task's

    @classmethod
    def of(cls, scatter: torch.Tensor, n: float, white: torch.Tensor) -> _Spread:
        """From a within-class scatter of ``n`` degrees of freedom and the pooled covariance's whitening W (x @ W
        has identity covariance)."""
        d = white.shape[0]
        lam, vecs = torch.linalg.eigh(white.T @ scatter @ white)
        lam = lam.clamp(min=0.0)
        a = d * _PRIOR_GRID
        nu0 = a + d + 1
        evidence = (torch.special.multigammaln((nu0 + n) / 2, d) - torch.special.multigammaln(nu0 / 2, d)
                    + nu0 / 2 * d * a.log() - (nu0 + n) / 2 * (a[:, None] + lam[None]).log().sum(1))
        a = a[int(evidence.argmax())].item()
        nu = a + n + 2
        scale = (a + lam) / nu
        const = (math.lgamma((nu + d) / 2) - math.lgamma(nu / 2) - d / 2 * math.log(nu * math.pi)
                 - 0.5 * scale.log().sum().item())
        proj = white @ vecs
        return cls(proj=proj.float(), inv_scale=(1 / scale).float(), const=const, nu=nu, prior_weight=a / (a + n))

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, d) features -> (B, d) in this spread's coordinates."""
        return feats.float() @ self.proj

    def log_density(self, y: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """(B, d) projected features, (C_t, d) projected class means -> (B, C_t) log-density of each class's
        predictive."""
        w = self.inv_scale
        m2 = ((y * y * w).sum(1, keepdim=True) - 2 * (y * w) @ means.T + (means ** 2 * w).sum(1))
        d = y.shape[1]
        return self.const - 0.5 * (self.nu + d) * torch.log1p(m2.clamp(min=0) / self.nu)


def _dof(s: RoutingStats) -> float:
    """A task's within-class degrees of freedom: its images less its classes with images."""
    return max(s.counts.sum().item() - int((s.counts > 0).sum()), 0.0)


def _balanced_covariance(stats: list[RoutingStats]) -> tuple[torch.Tensor, float]:
    """The mean of the tasks' own within-class covariances (each task weighs the same), and the degrees of freedom
    behind it (images less classes, over every task)."""
    d = stats[0].dim
    covs, dof = [], 0.0
    for s in stats:
        n = _dof(s)
        if n >= 1:
            covs.append(s.scatter.double() / n)
            dof += n
    if not covs:  # one image per class everywhere: nothing to estimate a spread from
        return torch.eye(d).double(), 1.0
    return sum(covs) / len(covs), dof


def oas_shrinkage(cov: torch.Tensor, n: float) -> float:
    """The oracle approximating shrinkage (Chen, Wiesel, Eldar & Hero 2010) of a sample covariance from ``n``
    degrees of freedom towards a multiple of the identity: the share of the identity, in [0, 1]."""
    cov = cov.double()
    d = cov.shape[0]
    tr, tr2 = cov.trace().item(), (cov * cov).sum().item()
    den = (n + 1 - 2 / d) * (tr2 - tr * tr / d)
    if den <= 0:
        return 1.0  # already a multiple of the identity
    return float(min(1.0, max(0.0, ((1 - 2 / d) * tr2 + tr * tr) / den)))

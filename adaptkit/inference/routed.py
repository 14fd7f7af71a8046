"""Predicting with no task name: route each image to a task by the frozen backbone's features, then run it through
that task (:meth:`AutoPredict.predict_auto`).

:class:`AutoPredict` is mixed into :class:`~adaptkit.inference.Predictor`; it uses the predictor's ``registry``,
``preprocess``, ``logits_mixed`` and its helpers. The routing classifier is :mod:`adaptkit.inference.router`.
"""

from __future__ import annotations

import torch

from adaptkit.checks import check_int
from adaptkit.errors import ConfigError, RoutingError, param, step
from adaptkit.inference.results import FrozenPrefix, ImageLike, LoadedTask, Route, RoutedPrediction
from adaptkit.inference.router import DEFAULT_ROUTER, Router
from adaptkit.inference.routing_stats import DEFAULT_REJECT_RATE, check_reject_rate, frozen
from adaptkit.trunk import first_changed_block, run_prefix, run_suffix, splittable

__all__ = ["AutoPredict"]


class AutoPredict:
    """Routed prediction over a predictor's tasks (see the module's docstring)."""

    def predict_auto(self, images: list[ImageLike], topk: int = 5, tasks: list[str] | None = None,
                     router: str = DEFAULT_ROUTER, accept_all: bool = False,
                     reject_rate: float = DEFAULT_REJECT_RATE) -> list[RoutedPrediction]:
        """Top-k labels of images with no task given: route each image to a task, then run it through that task.

        Only versions with routing statistics are routed over; the others are named in each answer's ``left_out``
        (a :class:`~adaptkit.errors.RoutingError` only when no candidate has statistics). One frozen pass per
        backbone scores every class of every task (see :mod:`adaptkit.inference.router`); one mixed pass per
        backbone then runs each image through its chosen task's adapter and head.

        Args:
            images: PIL images, paths, or tensors already transformed (tensors: tasks on one backbone only).
            topk: labels per image.
            tasks: the candidate tasks (``task`` or ``task@N``); default: every registered task's default version.
            router: the routing classifier: ``qda`` (default), ``lda``, ``ridge`` or ``ncm``.
            accept_all: never reject an image (``rejected`` is then always false).
            reject_rate: the share of a task's own images that would be rejected (calibrated per task at
                training time on held-out images; see :mod:`adaptkit.inference.routing_stats`).
        """
        check_int("topk", topk, 1)
        routes, batches, prefixes = self._route(images, tasks, router, None if accept_all else reject_rate)
        out: list[RoutedPrediction | None] = [None] * len(routes)
        by_host: dict[int, list[int]] = {}
        for i, r in enumerate(routes):
            by_host.setdefault(id(r.task.host), []).append(i)
        for members in by_host.values():
            key = id(routes[members[0]].task.host)
            x, prefix = batches[key], prefixes[key]
            if len(members) < len(x):  # the images routed to another backbone leave
                x = x[members]
                prefix = prefix and FrozenPrefix(prefix.trunk, prefix.start, prefix.tokens[members])
            logits = self.logits_mixed(x, [routes[i].task.ref for i in members], prefix)
            for i, row in zip(members, logits, strict=True):
                r = routes[i]
                out[i] = RoutedPrediction(r.task.ref, r.confidence, r.runner_up.ref if r.runner_up else None,
                                          r.runner_up_confidence, self._topk(row, r.task, topk), r.rejected, r.fit,
                                          r.left_out)
        return out  # type: ignore[return-value]

    def route(self, images: list[ImageLike], tasks: list[str] | None = None, router: str = DEFAULT_ROUTER,
              accept_all: bool = False, reject_rate: float = DEFAULT_REJECT_RATE) -> list[Route]:
        """Which task each image belongs to, with the routing posterior, the runner-up and whether no task fits it
        (see predict_auto)."""
        return self._route(images, tasks, router, None if accept_all else reject_rate)[0]

    def _route(self, images: list[ImageLike], tasks: list[str] | None, router: str, reject_rate: float | None = None
               ) -> tuple[list[Route], dict[int, torch.Tensor], dict[int, FrozenPrefix | None]]:
        if reject_rate is not None:
            check_reject_rate(reject_rate)
        routable, left_out = self._candidates(tasks)
        hosts = self.by_backbone(routable)
        batches = {key: self.preprocess(images, members[0]) for key, members in hosts.items()}
        # one frozen pass per backbone gives the router its features and the blocks' tokens its rejection reads
        passes = {key: self.frozen_pass(batches[key], members, self._router(members, router).blocks)
                  for key, members in hosts.items()}
        feats = {key: f for key, (f, _, _) in passes.items()}
        taps = {key: t for key, (_, _, t) in passes.items()}
        routes = self.pick(hosts, feats, router, reject_rate, taps)
        for r in routes:
            r.left_out = left_out
        return routes, batches, {key: p for key, (_, p, _) in passes.items()}

    @staticmethod
    def by_backbone(tasks: list[LoadedTask]) -> dict[int, list[LoadedTask]]:
        """Tasks grouped by the resident backbone they are attached to."""
        hosts: dict[int, list[LoadedTask]] = {}
        for t in tasks:
            hosts.setdefault(id(t.host), []).append(t)
        return hosts

    def frozen_features(self, x: torch.Tensor, task: LoadedTask) -> torch.Tensor:
        """The bare backbone's (B, d) features of a preprocessed batch, whatever tasks are attached to it."""
        with self._gate.reading(), torch.inference_mode(), self._autocast(), frozen(task.host.backbone.model) as trunk:
            return trunk(x).float()

    def frozen_prefix(self, x: torch.Tensor, tasks: list[LoadedTask]) -> tuple[torch.Tensor, FrozenPrefix | None]:
        """The bare backbone's (B, d) features of a batch, and its tokens at the first block any of ``tasks`` (all
        on one backbone) changes, for their own pass to start from (None when one of them changes something
        before the first block)."""
        return self.frozen_pass(x, tasks)[:2]  # type: ignore[return-value]

    def frozen_pass(self, x: torch.Tensor, tasks: list[LoadedTask], blocks: tuple[int, ...] = ()
                    ) -> tuple[torch.Tensor, FrozenPrefix | None, dict[int, torch.Tensor] | None]:
        """:meth:`frozen_prefix`, and from the same pass the mean patch tokens (B, d) after ``blocks`` (the index
        ``depth``: the pooled output) that the rejection score reads; None when the trunk cannot be split or none
        are asked for."""
        trunk = tasks[0].host.backbone.model
        depth = len(getattr(trunk, "blocks", ()))
        starts = [first_changed_block(t.model.parts, depth) for t in tasks if t.model.trunk is trunk]
        shareable = bool(starts) and None not in starts and splittable(trunk)
        taps = dict.fromkeys(blocks) if blocks and splittable(trunk) else None
        if not shareable and taps is None:
            return self.frozen_features(x, tasks[0]), None, None
        start = min(starts) if shareable else 0  # type: ignore[type-var]
        with self._gate.reading(), torch.inference_mode(), self._autocast(), frozen(trunk):
            tokens = run_prefix(trunk, x, start, taps)
            feats = run_suffix(trunk, tokens, start, taps).float()
        return (feats, FrozenPrefix(trunk, start, tokens) if shareable else None,
                taps and {b: t.float() for b, t in taps.items()})

    def pick(self, hosts: dict[int, list[LoadedTask]], feats: dict[int, torch.Tensor], router: str,
             reject_rate: float | None = None, taps: dict[int, dict[int, torch.Tensor] | None] | None = None
             ) -> list[Route]:
        """Route each image: within a backbone by the router's task posterior; across backbones to the one whose
        classes the image is most typical of (smallest standardised Mahalanobis distance). With ``reject_rate``
        an image goes to the most probable task it fits (see :meth:`Routes.choose`), and is marked rejected only
        when it fits no candidate task (its task is then the nearest one); ``taps``: per backbone the mean patch
        tokens the tasks' rejection scores read (:attr:`Router.blocks`)."""
        best: list[tuple[tuple[bool, float], Route]] = []
        for key, members in hosts.items():
            routes = self._router(members, router).route(feats[key], (taps or {}).get(key))
            chosen, runner, rejected = (v.tolist() for v in routes.choose(reject_rate))
            probs, typical = routes.task_probs.tolist(), routes.typicality.tolist()
            fits = routes.fit.tolist() if routes.fit is not None else None
            for b, (c, u, no) in enumerate(zip(chosen, runner, rejected, strict=True)):
                other = members[u] if len(members) > 1 else None
                fit = fits[b][c] if fits is not None else None
                fit = None if fit is None or fit != fit else fit  # NaN: the version has no percentiles
                route = Route(members[c], probs[b][c], other, probs[b][u] if other else 0.0, fit, no)
                rank = (no, typical[b])  # a backbone with a task the image fits first, then the most typical
                if b == len(best):
                    best.append((rank, route))
                elif rank < best[b][0]:
                    best[b] = (rank, route)
        return [r for _, r in best]

    def _candidates(self, tasks: list[str] | None) -> tuple[list[LoadedTask], tuple[str, ...]]:
        """The candidate versions that have routing statistics, and the refs of those left out for lacking them
        (trained before routing existed, or imported); an error only when none has them."""
        refs = tasks if tasks is not None else [t.name for t in self.registry.tasks() if t.versions]
        if not refs:
            raise ConfigError(f"no tasks to route to: train one first ({step('train')}) or name a task "
                              f"({param('task')})")
        loaded = list({id(t): t for t in (self._task(r) for r in refs)}.values())
        missing = tuple(t.ref for t in loaded if t.routing is None)
        if len(missing) == len(loaded):
            names = " ".join(sorted({m.partition("@")[0] for m in missing}))
            raise RoutingError(f"{', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} no routing statistics "
                               f"(trained before routing existed, or imported): run {step('routing_fit', names)} "
                               f"to compute them, or name the task ({param('task')})")
        return [t for t in loaded if t.routing is not None], missing

    def _router(self, tasks: list[LoadedTask], kind: str) -> Router:
        key = (kind, *(id(t) for t in tasks))
        if key not in self._routers:  # the tasks are kept with their router, so their ids stay theirs
            # tasks trained on one data set (its classes split into tasks) share one spread; a task whose file
            # names no data set is its own
            groups = [t.meta.dataset or f"task {t.ref}" for t in tasks]
            self._routers[key] = (tasks, Router([t.routing for t in tasks], kind=kind,  # type: ignore[misc]
                                                groups=groups))
        return self._routers[key][1]

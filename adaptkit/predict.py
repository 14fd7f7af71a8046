"""Serving many tasks from one backbone: load it once, attach adapters, switch tasks, predict, mix tasks in a batch.

Switching the active task sets one attribute of the backbone's :class:`~adaptkit.methods.TaskContext`; it never
rebuilds a module or reloads the backbone. In a mixed batch the backbone runs once and each sample goes through its
own task's adapter (gathered per sample, applied with batched matrix products) and its own head.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from adaptkit.artifacts import AdapterMeta
from adaptkit.backbone import Backbone, create_backbone
from adaptkit.checks import check_int
from adaptkit.devices import resolve_device
from adaptkit.errors import ArtifactError, ConfigError, RoutingError
from adaptkit.methods import TaskModel, get_method, merge_lora
from adaptkit.registry import Registry, VersionRow
from adaptkit.routing import DEFAULT_REJECT_RATE, Router, RoutingStats, check_reject_rate, frozen, split_state
from adaptkit.trunk import first_changed_block, run_prefix, run_suffix, splittable

__all__ = ["Prediction", "RoutedPrediction", "Route", "Predictor", "LoadedTask", "default_device"]

_log = logging.getLogger(__name__)
ImageLike = Image.Image | str | Path | torch.Tensor | np.ndarray


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    prob: float


@dataclass(frozen=True)
class RoutedPrediction:
    """An image's answer with no task given: the task the router chose, how sure it was, and the labels.

    ``rejected``: the image fits none of the tasks: it is less typical of the chosen (nearest) task than all but
    the rejection rate of the task's own images (``task`` and ``predictions`` are still the nearest task's).
    """

    task: str  # task@N; when rejected, the nearest task
    confidence: float  # the routing posterior of ``task``
    runner_up: str | None  # the next most likely task (None when only one task was asked)
    runner_up_confidence: float
    predictions: list[Prediction]
    rejected: bool = False  # no task fits the image (never with accept_all, or for versions without percentiles)
    fit: float | None = None  # share of ``task``'s own images less typical than this one; None: not calibrated


@dataclass
class Route:
    """Where the router sends one image."""

    task: LoadedTask
    confidence: float
    runner_up: LoadedTask | None
    runner_up_confidence: float
    fit: float | None = None  # share of the task's own images less typical than this one (None: not calibrated)
    rejected: bool = False  # fit below the rejection rate: the image belongs to none of the tasks


@dataclass
class LoadedTask:
    """A registered version attached to a resident backbone."""

    ref: str
    meta: AdapterMeta
    model: TaskModel
    host: _Host
    routing: RoutingStats | None = None  # what routing needs of this version, if its file has it

    @property
    def classes(self) -> list[str]:
        return self.meta.classes


@dataclass(frozen=True)
class FrozenPrefix:
    """The bare backbone's tokens at block ``start`` of a batch: where the tasks' own pass can begin, since none of
    the tasks it was computed for changes anything before that block (the pooled features when ``start`` is the
    depth: a linear probe's head reads them directly)."""

    trunk: torch.nn.Module
    start: int
    tokens: torch.Tensor


@dataclass
class _Host:
    """One resident backbone, its eval transform and the tasks attached to it."""

    backbone: Backbone
    transform: Any
    tasks: dict[str, LoadedTask] = field(default_factory=dict)  # by adapter file sha256


class Predictor:
    """Predict with registered tasks.

    Args:
        registry: a :class:`Registry` or its URL (default: ``$ADAPTKIT_REGISTRY`` or ``./registry.db``).
        device: ``cuda``, ``cpu`` ...; default: CUDA when available.
        max_backbones: how many backbones stay in memory at once (least recently used ones are dropped).
        merge_lora: run a single ``lora`` task through a copy with its update merged into the weights.
    """

    def __init__(self, registry: Registry | str | None = None, *, device: str | None = None,
                 max_backbones: int = 2, merge_lora: bool = False) -> None:
        check_int("max_backbones", max_backbones, 1)
        self.device = resolve_device(device)
        self.registry = registry if isinstance(registry, Registry) else Registry(registry)
        self.max_backbones = max_backbones
        self.merge_lora = merge_lora
        self._hosts: OrderedDict[str, _Host] = OrderedDict()  # by backbone fingerprint, LRU order
        self._refs: dict[str, LoadedTask] = {}  # "task" and "task@N" -> loaded task
        self._merged: tuple[str, torch.nn.Module] | None = None
        self._routers: dict[tuple, tuple[list[LoadedTask], Router]] = {}  # by (router kind, the tasks' file hashes)
        self.active: LoadedTask | None = None

    # -- loading and switching ---------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Forget how refs resolve (after the registry changed); resident backbones and adapters stay."""
        self._refs.clear()
        self._routers.clear()

    def load(self, ref: str) -> LoadedTask:
        """Attach the version ``ref`` (``task`` or ``task@N``) to its backbone, loading either if needed."""
        if ref in self._refs:
            return self._refs[ref]
        row = self.registry.get_version(ref)
        key = f"{row.task.name}@{row.version}"
        host = self._host_for(row)
        task = host.tasks.get(row.sha256)  # by content: a task removed and trained again is a new file
        if task is None:
            task = self._attach(host, row, key)
        self._refs[ref] = self._refs[key] = task
        return task

    def activate(self, ref: str) -> LoadedTask:
        """Make ``ref`` the active task: one attribute set when it is resident."""
        task = self._refs.get(ref) or self.load(ref)
        task.model.ctx.active = task.model.slot
        self.active = task
        return task

    def unload(self, ref: str) -> None:
        """Detach a task's adapter from its backbone and free it."""
        task = self._refs.get(ref)
        if task is None:
            return
        task.model.detach_from_trunk()
        task.host.tasks = {k: v for k, v in task.host.tasks.items() if v is not task}
        for k in [k for k, v in self._refs.items() if v is task]:
            del self._refs[k]
        if self.active is task:
            self.active = None

    def _host_for(self, row: VersionRow) -> _Host:
        fp = row.backbone.fingerprint
        if fp in self._hosts:
            self._hosts.move_to_end(fp)
            return self._hosts[fp]
        while len(self._hosts) >= self.max_backbones:
            _, old = self._hosts.popitem(last=False)
            for k in [k for k, v in self._refs.items() if v.host is old]:
                del self._refs[k]
            _log.info("dropped backbone %s from memory", old.backbone.name)
        backbone = create_backbone(row.backbone.name, weights=row.backbone.weights, device=self.device, expect=fp)
        from adaptkit.data import build_transform

        host = _Host(backbone=backbone, transform=build_transform(backbone.data_config, train=False))
        self._hosts[fp] = host
        return host

    def _attach(self, host: _Host, row: VersionRow, key: str) -> LoadedTask:
        state, meta = self.registry.load_version(row, fingerprint=host.backbone.fingerprint, device=self.device)
        state, stats = split_state(state)
        try:
            model = get_method(meta.method, meta.method_config).attach(host.backbone.model, len(meta.classes),
                                                                       state=state)
        except ConfigError as exc:
            raise ArtifactError(f"adapter file of {key} does not fit its method: {exc}") from exc
        model.eval()
        task = LoadedTask(ref=key, meta=meta, model=model, host=host, routing=stats)
        host.tasks[row.sha256] = task
        return task

    # -- predicting --------------------------------------------------------------------------------------------

    def preprocess(self, images: list[ImageLike], task: LoadedTask) -> torch.Tensor:
        """Images (paths, PIL, numpy pixels, or tensors already transformed) -> a (B, 3, H, W) batch on the device."""
        from adaptkit.data.inputs import as_image_list, image_to_input

        size = task.host.backbone.data_config["input_size"]
        tensors = [image_to_input(img, task.host.transform, size) for img in as_image_list(images)]
        return torch.stack(tensors).to(self.device)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, ref: str | None = None) -> torch.Tensor:
        """Logits of a preprocessed batch under task ``ref`` (default: the active task)."""
        task = self._task(ref)
        with self._autocast():
            if self.merge_lora and task.meta.method == "lora":
                return self._merged_model(task)(x).float()
            self.activate(task.ref)
            return task.model(x).float()

    @torch.inference_mode()
    def logits_mixed(self, x: torch.Tensor, refs: list[str], prefix: FrozenPrefix | None = None) -> list[torch.Tensor]:
        """Per-sample logits for a batch whose sample b belongs to task ``refs[b]``; the backbone runs once.

        Args:
            x: the preprocessed batch.
            refs: one task per sample.
            prefix: the frozen pass's tokens of this batch (see :meth:`frozen_prefix`); the samples of tasks on its
                trunk then start at its block instead of at the image.
        """
        if len(refs) != x.shape[0]:
            raise ConfigError(f"{x.shape[0]} images but {len(refs)} task names: give one task per image")
        tasks = [self._task(r) for r in refs]
        out: list[torch.Tensor | None] = [None] * len(tasks)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tasks):  # one pass per trunk (a full copy has its own) and per number of added tokens
            groups.setdefault((id(t.model.trunk), t.model.method.added_tokens()), []).append(i)
        with self._autocast():
            for members in groups.values():
                self._run_group(x, tasks, members, out, prefix)
        return out  # type: ignore[return-value]

    def _run_group(self, x: torch.Tensor, tasks: list[LoadedTask], members: list[int], out: list,
                   prefix: FrozenPrefix | None) -> None:
        first = tasks[members[0]]
        ctx, trunk = first.model.ctx, first.model.trunk
        slots = tuple(sorted({tasks[i].model.slot for i in members}))
        index = torch.tensor([slots.index(tasks[i].model.slot) for i in members], device=x.device)
        whole = members == list(range(len(x)))  # no copy of the batch when the group is all of it
        ctx.slot_order, ctx.sample_slots = slots, index
        try:
            if prefix is not None and prefix.trunk is trunk:
                feats = run_suffix(trunk, prefix.tokens if whole else prefix.tokens[members], prefix.start)
            else:
                feats = trunk(x if whole else x[members])
        finally:
            ctx.sample_slots = None
        rows: dict[int, list[int]] = {}  # one head call per task, over its samples
        for j, i in enumerate(members):
            rows.setdefault(id(tasks[i]), []).append(j)
        for js in rows.values():
            logits = tasks[members[js[0]]].model.head(feats[js]).float()
            for k, j in enumerate(js):
                out[members[j]] = logits[k]

    def predict(self, images: list[ImageLike], ref: str | None = None, topk: int = 5) -> list[list[Prediction]]:
        """Top-k labels with probabilities for each image under one task."""
        check_int("topk", topk, 1)
        task = self._task(ref)
        return [self._topk(row, task, topk) for row in self.logits(self.preprocess(images, task), task.ref)]

    def predict_mixed(self, images: list[ImageLike], refs: list[str], topk: int = 5) -> list[list[Prediction]]:
        """Top-k predictions for images that each name their own task, in one backbone pass per backbone."""
        check_int("topk", topk, 1)
        tasks = [self._task(r) for r in refs]
        if len(images) != len(tasks):
            raise ConfigError(f"{len(images)} images but {len(tasks)} task names: give one task per image")
        x = torch.cat([self.preprocess([img], t) for img, t in zip(images, tasks, strict=True)])
        return [self._topk(row, t, topk) for row, t in zip(self.logits_mixed(x, refs), tasks, strict=True)]

    # -- predicting with no task name ---------------------------------------------------------------------------

    def predict_auto(self, images: list[ImageLike], topk: int = 5, tasks: list[str] | None = None,
                     router: str = "lda", accept_all: bool = False,
                     reject_rate: float = DEFAULT_REJECT_RATE) -> list[RoutedPrediction]:
        """Top-k labels of images with no task given: route each image to a task, then run it through that task.

        One frozen pass per backbone scores every class of every task (see :mod:`adaptkit.routing`); one mixed pass
        per backbone then runs each image through its chosen task's adapter and head.

        Args:
            images: PIL images, paths, or tensors already transformed (tensors: tasks on one backbone only).
            topk: labels per image.
            tasks: the candidate tasks (``task`` or ``task@N``); default: every registered task's default version.
            router: the routing classifier: ``lda`` (default), ``qda``, ``ridge`` or ``ncm``.
            accept_all: never reject an image (``rejected`` is then always false).
            reject_rate: the share of a task's own images that would be rejected (calibrated per task at
                training time on held-out images; see :mod:`adaptkit.routing`).
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
                                          r.runner_up_confidence, self._topk(row, r.task, topk), r.rejected, r.fit)
        return out  # type: ignore[return-value]

    def route(self, images: list[ImageLike], tasks: list[str] | None = None, router: str = "lda",
              accept_all: bool = False, reject_rate: float = DEFAULT_REJECT_RATE) -> list[Route]:
        """Which task each image belongs to, with the routing posterior, the runner-up and whether no task fits it
        (see predict_auto)."""
        return self._route(images, tasks, router, None if accept_all else reject_rate)[0]

    def _route(self, images: list[ImageLike], tasks: list[str] | None, router: str, reject_rate: float | None = None
               ) -> tuple[list[Route], dict[int, torch.Tensor], dict[int, FrozenPrefix | None]]:
        if reject_rate is not None:
            check_reject_rate(reject_rate)
        hosts = self.by_backbone(self._candidates(tasks))
        batches = {key: self.preprocess(images, members[0]) for key, members in hosts.items()}
        passes = {key: self.frozen_prefix(batches[key], members) for key, members in hosts.items()}
        feats = {key: f for key, (f, _) in passes.items()}
        return self.pick(hosts, feats, router, reject_rate), batches, {key: p for key, (_, p) in passes.items()}

    @staticmethod
    def by_backbone(tasks: list[LoadedTask]) -> dict[int, list[LoadedTask]]:
        """Tasks grouped by the resident backbone they are attached to."""
        hosts: dict[int, list[LoadedTask]] = {}
        for t in tasks:
            hosts.setdefault(id(t.host), []).append(t)
        return hosts

    def frozen_features(self, x: torch.Tensor, task: LoadedTask) -> torch.Tensor:
        """The bare backbone's (B, d) features of a preprocessed batch, whatever tasks are attached to it."""
        with torch.inference_mode(), self._autocast(), frozen(task.host.backbone.model) as trunk:
            return trunk(x).float()

    def frozen_prefix(self, x: torch.Tensor, tasks: list[LoadedTask]) -> tuple[torch.Tensor, FrozenPrefix | None]:
        """The bare backbone's (B, d) features of a batch, and its tokens at the first block any of ``tasks`` (all
        on one backbone) changes, for their own pass to start from (None when one of them changes something
        before the first block)."""
        trunk = tasks[0].host.backbone.model
        depth = len(getattr(trunk, "blocks", ()))
        starts = [first_changed_block(t.model.parts, depth) for t in tasks if t.model.trunk is trunk]
        if not starts or None in starts or not splittable(trunk):
            return self.frozen_features(x, tasks[0]), None
        start = min(starts)  # type: ignore[type-var]
        with torch.inference_mode(), self._autocast(), frozen(trunk):
            tokens = run_prefix(trunk, x, start)
            feats = run_suffix(trunk, tokens, start).float()
        return feats, FrozenPrefix(trunk, start, tokens)

    def pick(self, hosts: dict[int, list[LoadedTask]], feats: dict[int, torch.Tensor], router: str,
             reject_rate: float | None = None) -> list[Route]:
        """Route each image: within a backbone by the router's task posterior; across backbones to the one whose
        classes the image is most typical of (smallest standardised Mahalanobis distance). With ``reject_rate``
        an image whose chosen task fits it less than that (see :class:`Route`) is marked rejected."""
        best: list[tuple[float, Route]] = []
        for key, members in hosts.items():
            routes = self._router(members, router).route(feats[key])
            (values, indices), typical = routes.ranked(), routes.typicality.tolist()
            fits = routes.fit.tolist() if routes.fit is not None else None
            for b, (v, i) in enumerate(zip(values.tolist(), indices.tolist(), strict=True)):
                runner = members[i[1]] if len(members) > 1 else None
                fit = fits[b][i[0]] if fits is not None else None
                fit = None if fit is None or fit != fit else fit  # NaN: the version has no percentiles
                rejected = reject_rate is not None and fit is not None and fit < reject_rate
                route = Route(members[i[0]], v[0], runner, v[1] if runner else 0.0, fit, rejected)
                if b == len(best):
                    best.append((typical[b], route))
                elif typical[b] < best[b][0]:
                    best[b] = (typical[b], route)
        return [r for _, r in best]

    def _candidates(self, tasks: list[str] | None) -> list[LoadedTask]:
        refs = tasks if tasks is not None else [t.name for t in self.registry.tasks() if t.versions]
        if not refs:
            raise ConfigError("no tasks to route to: train one first (adaptkit train) or pass a task name")
        loaded = list({id(t): t for t in (self._task(r) for r in refs)}.values())
        missing = [t.ref for t in loaded if t.routing is None]
        if missing:
            names = " ".join(sorted({m.partition("@")[0] for m in missing}))
            raise RoutingError(f"{', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} no routing statistics "
                               f"(trained before routing existed, or imported): run `adaptkit routing fit {names}` "
                               "to compute them, or name the task (--task)")
        return loaded

    def _router(self, tasks: list[LoadedTask], kind: str) -> Router:
        key = (kind, *(id(t) for t in tasks))
        if key not in self._routers:  # the tasks are kept with their router, so their ids stay theirs
            self._routers[key] = (tasks, Router([t.routing for t in tasks], kind=kind))  # type: ignore[misc]
        return self._routers[key][1]

    # -- helpers -----------------------------------------------------------------------------------------------

    def _task(self, ref: str | None) -> LoadedTask:
        if ref is not None and not isinstance(ref, str):
            raise ConfigError(f"a task must be named by a string, TASK or TASK@N, got {ref!r}")
        if ref is None:
            if self.active is None:
                raise ConfigError("no active task: pass a task name or call activate(TASK) first")
            return self.active
        return self._refs.get(ref) or self.load(ref)

    def _merged_model(self, task: LoadedTask) -> torch.nn.Module:
        if self._merged is None or self._merged[0] != task.ref:
            self._merged = None  # free the previous copy before making the next
            self._merged = (task.ref, merge_lora(task.model))
        return self._merged[1]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @staticmethod
    def _topk(logits: torch.Tensor, task: LoadedTask, k: int) -> list[Prediction]:
        probs = logits.float().softmax(-1)
        values, indices = probs.topk(min(max(k, 1), probs.numel()))
        return [Prediction(task.classes[i], int(i), float(p)) for p, i in zip(values.tolist(), indices.tolist(),
                                                                              strict=True)]

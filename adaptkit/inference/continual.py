"""Continual learning over the registry: routing statistics for registered versions, and class-incremental evaluation.

:func:`fit_routing` computes the routing statistics of versions whose files lack them (trained before routing
existed, or imported) and records each as a new file of that version. :func:`evaluate_continual` replays the
registered tasks in the order they were added: after each addition it predicts every test image seen so far with no
task name (routed) and with its task given, and reports the field's metrics (accuracy matrix, average incremental
accuracy, forgetting), with SimpleCIL (cosine nearest class mean on frozen features) measured on the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from adaptkit.data import TransformedSubset, load_task_data
from adaptkit.errors import DatasetError, RoutingError, param, step
from adaptkit.inference.predictor import Predictor
from adaptkit.inference.results import LoadedTask
from adaptkit.inference.router import DEFAULT_ROUTER, Router
from adaptkit.inference.routing_stats import collect_task_stats, split_state
from adaptkit.inference.token_stats import tapped_blocks
from adaptkit.registry import Registry, TaskRow
from adaptkit.trunk import SPECTRUM

__all__ = ["fit_routing", "evaluate_continual", "compare_routers", "ContinualReport", "task_order"]


def task_order(registry: Registry, tasks: list[str] | None = None) -> list[str]:
    """The given refs, or every task that has versions, in the order the tasks were added."""
    if tasks:
        return list(tasks)
    rows: list[TaskRow] = [t for t in registry.tasks() if t.versions]
    return [t.name for t in sorted(rows, key=lambda t: (t.created_at, t.id))]


def fit_routing(tasks: list[str] | None = None, *, registry: Registry | str | None = None, force: bool = False,
                dataset: str | None = None, device: str | None = None, data_dir: str | None = None,
                download: bool = True, batch_size: int = 128,
                on_task: Callable[[str, str], None] | None = None) -> list[str]:
    """Compute routing statistics for registered versions that lack them, the rejection percentiles, the token
    statistics or one of their places (the patch spectrum, added after the first token statistics; see
    :mod:`adaptkit.inference.routing_stats`); returns the refs that got new files.

    Args:
        tasks: ``task`` or ``task@N`` refs (default: every task's default version).
        registry: a :class:`Registry` or its URL.
        force: recompute statistics that are there already.
        dataset: the data set to read (default: the one each version was trained on); only with one task. An
            imported version's data set is the word of the file it came from, never read on trust: such a version
            needs ``dataset`` (named alone it is an error without one; among every task it is skipped, with a note).
        device, data_dir, download, batch_size: as for training.
        on_task: called with (ref, what happened) after each version.
    """
    registry = registry if isinstance(registry, Registry) else Registry(registry)
    refs = task_order(registry, tasks)
    if dataset and len(refs) != 1:
        raise DatasetError(f"{param('dataset')} names one task's data set: give exactly one task with it")
    predictor = Predictor(registry, device=device)
    done = []
    for ref in refs:
        row = registry.get_version(ref)
        state, meta = registry.load_version(row)
        own, stats = split_state(state)
        places = set(stats.tokens.blocks) if stats is not None and stats.tokens is not None else set()
        complete = stats is not None and stats.calibrated and SPECTRUM in places
        if stats is not None and stats.calibrated and not complete:  # places missing: their trunk may lack them
            complete = set(tapped_blocks(predictor.load(row.ref).host.backbone.model)) <= places
        if complete and not force:
            (on_task or (lambda *a: None))(row.ref, "has routing statistics already")
            continue
        if not dataset and row.train.get("imported_from"):
            why = (f"it was imported, and the data set its file names ({meta.dataset[:80]!r}) is not read on trust: "
                   f"pass the data set to read as {param('dataset')} with that one task")
            if tasks:
                raise DatasetError(f"cannot compute routing statistics of {row.ref}: {why}")
            (on_task or (lambda *a: None))(row.ref, f"skipped: {why}")
            continue
        host = predictor.load(row.ref).host
        spec = dataset or meta.dataset
        recipe = row.train.get("recipe", {})
        try:
            data = load_task_data(spec, host.backbone.data_config, data_dir=data_dir, download=download,
                                  classes=meta.classes, seed=recipe.get("seed", 0), augment=False,
                                  val_fraction=recipe.get("val_fraction", 0.1),
                                  limit_train=recipe.get("limit_train"), limit_eval=recipe.get("limit_eval"))
        except DatasetError as exc:
            raise DatasetError(f"cannot compute routing statistics of {row.ref}: {exc} (pass the data set it "
                               f"was trained on as {param('dataset')})") from exc
        stats = collect_task_stats(host.backbone.model, data, predictor.device, batch_size)
        registry.replace_file(row, {**own, **stats.to_tensors()}, meta)
        done.append(row.ref)
        (on_task or (lambda *a: None))(row.ref, f"routing statistics from {len(data.train) + len(data.val)} images")
    return done


@dataclass
class ContinualReport:
    """Continual metrics over tasks in the order they were added (stage k = after the k-th task)."""

    tasks: list[str]  # task@N in order
    router: str
    images: list[int]  # test images per task
    task_id: list[float]  # per stage: share of seen images routed to their own task
    cil: list[float]  # per stage: class-incremental accuracy over the union of seen classes (no task given)
    til: list[float]  # per stage: task-incremental accuracy (task given)
    simplecil: list[float]  # per stage: SimpleCIL (cosine nearest class mean, frozen features) on the same images
    matrix: list[list[float | None]]  # [stage][task]: class-incremental accuracy on that task's test images
    refined: list[float] = field(default_factory=list)  # per stage: router x adapter posterior over the top 2 tasks

    @property
    def average_incremental(self) -> float:
        return sum(self.cil) / len(self.cil)

    @property
    def final(self) -> float:
        return self.cil[-1]

    @property
    def forgetting(self) -> float:
        """Mean over all but the last task of (best earlier accuracy - final accuracy) on that task."""
        n = len(self.tasks)
        if n < 2:
            return 0.0
        drops = [max(self.matrix[k][j] for k in range(j, n - 1)) - self.matrix[n - 1][j] for j in range(n - 1)]
        return sum(drops) / len(drops)  # type: ignore[arg-type, operator]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "average_incremental": self.average_incremental, "final": self.final,
                "forgetting": self.forgetting}


def evaluate_continual(tasks: list[str] | None = None, *, registry: Registry | str | None = None,
                       router: str = DEFAULT_ROUTER, limit: int | None = None, device: str | None = None,
                       data_dir: str | None = None, download: bool = True, batch_size: int = 256,
                       refine: bool = False) -> ContinualReport:
    """Evaluate registered tasks as a class-incremental sequence, in the order they were added.

    Args:
        tasks: refs in the order to add them (default: every task, in the order they were registered).
        registry: a :class:`Registry` or its URL.
        router: the routing classifier (``qda``, the default, ``lda``, ``ridge``, ``ncm``).
        limit: test images per task (seeded subset).
        device, data_dir, download: as for evaluation.
        batch_size: images per backbone pass.
        refine: also measure routing refined by the adapters (top-2 tasks, router x adapter posterior).
    """
    return compare_routers(tasks, [router], registry=registry, limit=limit, device=device, data_dir=data_dir,
                           download=download, batch_size=batch_size, refine=refine)[router]


def compare_routers(tasks: list[str] | None, routers: list[str], *, registry: Registry | str | None = None,
                    limit: int | None = None, device: str | None = None, data_dir: str | None = None,
                    download: bool = True, batch_size: int = 256, refine: bool = False) -> dict[str, ContinualReport]:
    """:func:`evaluate_continual` under several routers, on the same features and logits (computed once).

    Args:
        tasks: refs in the order to add them (default: every task, in the order they were registered).
        registry: a :class:`Registry` or its URL.
        routers: the routing classifiers to compare (``qda``, the default, ``lda``, ``ridge``, ``ncm``).
        limit: test images per task (seeded subset).
        device, data_dir, download: as for evaluation.
        batch_size: images per backbone pass.
        refine: also measure routing refined by the adapters (top-2 tasks, router x adapter posterior).
    """
    predictor = Predictor(registry, device=device)
    loaded = [predictor.load(r) for r in task_order(predictor.registry, tasks)]
    missing = [t.ref for t in loaded if t.routing is None]
    if missing:
        names = " ".join(t.partition("@")[0] for t in missing)
        raise RoutingError(f"{', '.join(missing)} lack routing statistics: run {step('routing_fit', names)} first")
    hosts_all = predictor.by_backbone(loaded)
    sets = [_TestSet.load(predictor, j, loaded, hosts_all, limit, data_dir, download, batch_size)
            for j in range(len(loaded))]
    return {router: _replay(predictor, loaded, sets, router, refine) for router in routers}


def _replay(predictor: Predictor, loaded: list[LoadedTask], sets: list[_TestSet], router: str,
            refine: bool) -> ContinualReport:
    n = len(loaded)
    report = ContinualReport(tasks=[t.ref for t in loaded], router=router, images=[len(s.labels) for s in sets],
                             task_id=[], cil=[], til=[], simplecil=[], matrix=[])
    for k in range(1, n + 1):
        hosts = predictor.by_backbone(loaded[:k])
        stage = [ts.stage(predictor, loaded, hosts, router, refine) for ts in sets[:k]]
        total = sum(len(ts.labels) for ts in sets[:k])
        report.matrix.append([c["cil"] / len(ts.labels) for c, ts in zip(stage, sets, strict=False)]
                             + [None] * (n - k))
        for name in ("task_id", "cil", "til", "simplecil", *(("refined",) if refine else ())):
            getattr(report, name).append(sum(c[name] for c in stage) / total)
    return report


@dataclass
class _TestSet:
    """One task's test images with their frozen features per backbone and their logits under tasks, computed once."""

    task: int  # index of its own task
    images: torch.Tensor  # (N, 3, H, W) in its own task's eval transform
    labels: torch.Tensor
    features: dict[int, torch.Tensor]  # by backbone (key of Predictor.by_backbone)
    batch_size: int
    taps: dict[int, dict[int, torch.Tensor] | None] = field(default_factory=dict)  # by backbone: block tokens
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # by task index: (N, C_t), NaN where not run

    @classmethod
    def load(cls, predictor: Predictor, j: int, tasks: list[LoadedTask], hosts: dict[int, list[LoadedTask]],
             limit: int | None, data_dir: str | None, download: bool, batch_size: int) -> _TestSet:
        own = tasks[j]
        data = load_task_data(own.meta.dataset, own.host.backbone.data_config, data_dir=data_dir,
                              download=download, classes=own.classes, limit_eval=limit, augment=False)
        if len(data.test) == 0:
            raise DatasetError(f"{own.ref}: its data set {own.meta.dataset} has no test images")
        pairs = [data.test[i] for i in range(len(data.test))]
        images, labels = torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
        features, taps = {}, {}
        for key, members in hosts.items():
            x = images
            if members[0].host.backbone.data_config != own.host.backbone.data_config:
                raw = TransformedSubset(data.test.source, data.test.indices, None)
                x = predictor.preprocess([raw[i][0] for i in range(len(raw))], members[0])
            blocks = tuple(sorted({b for t in members if t.routing.tokens for b in t.routing.tokens.blocks}))
            parts = [predictor.frozen_pass(x[i:i + batch_size].to(predictor.device), members, blocks)
                     for i in range(0, len(x), batch_size)]
            features[key] = torch.cat([f.cpu() for f, _, _ in parts])
            taps[key] = {b: torch.cat([t[b].cpu() for _, _, t in parts]) for b in blocks} if parts[0][2] else None
        return cls(task=j, images=images, labels=labels, features=features, batch_size=batch_size, taps=taps)

    def stage(self, predictor: Predictor, tasks: list[LoadedTask], hosts: dict[int, list[LoadedTask]],
              router: str, refine: bool) -> dict[str, int]:
        """Counts of correct answers on this set with the tasks of ``hosts`` registered."""
        routes = predictor.pick(hosts, self.features, router, taps=self.taps)
        own = tasks[self.task]
        routed_home = torch.tensor([r.task is own for r in routes])
        given = self.task_logits(predictor, tasks, self.task, list(range(len(self.labels)))).argmax(1)
        right = given == self.labels
        counts = {"task_id": int(routed_home.sum()), "cil": int((routed_home & right).sum()),
                  "til": int(right.sum()), "simplecil": self._simplecil(hosts, tasks)}
        if refine:
            counts["refined"] = self._refined(predictor, tasks, hosts, router, routes)
        return counts

    def task_logits(self, predictor: Predictor, tasks: list[LoadedTask], t: int, rows: list[int]) -> torch.Tensor:
        """(len(rows), C_t) logits of images ``rows`` under task ``t``, each image run once per task."""
        if t not in self.logits:
            self.logits[t] = torch.full((len(self.labels), len(tasks[t].classes)), float("nan"))
        cache = self.logits[t]
        todo = [r for r in rows if torch.isnan(cache[r, 0])]
        for i in range(0, len(todo), self.batch_size):
            part = todo[i:i + self.batch_size]
            cache[part] = predictor.logits(self.images[part].to(predictor.device), tasks[t].ref).cpu()
        return cache[rows]

    def _simplecil(self, hosts: dict[int, list[LoadedTask]], tasks: list[LoadedTask]) -> int:
        """SimpleCIL: cosine nearest class mean over every seen class (on this set's own backbone)."""
        key = id(tasks[self.task].host)
        members = hosts[key]
        router = Router([t.routing for t in members], kind="ncm")  # type: ignore[misc]
        pred = router.scores(self.features[key]).argmax(1)
        offset = sum(len(t.classes) for t in members[:members.index(tasks[self.task])])
        return int((pred == self.labels + offset).sum())

    def _refined(self, predictor: Predictor, tasks: list[LoadedTask], hosts: dict[int, list[LoadedTask]],
                 router: str, routes: list) -> int:
        """Router x adapter: over the top two tasks (same backbone), the (task, class) of highest joint posterior."""
        own = tasks[self.task]
        best = torch.zeros(len(self.labels))
        home = torch.zeros(len(self.labels), dtype=torch.bool)
        pred = torch.zeros(len(self.labels), dtype=torch.long)
        for rank in ("task", "runner_up"):
            for t in {id(getattr(r, rank)): getattr(r, rank) for r in routes if getattr(r, rank)}.values():
                if t.host is not own.host:
                    continue
                rows = [i for i, r in enumerate(routes) if getattr(r, rank) is t]
                conf = torch.tensor([getattr(routes[i], "confidence" if rank == "task" else "runner_up_confidence")
                                     for i in rows])
                probs = self.task_logits(predictor, tasks, tasks.index(t), rows).softmax(1) * conf[:, None]
                value, label = probs.max(1)
                better = value > best[rows]
                idx = torch.tensor(rows)[better]
                best[idx], pred[idx], home[idx] = value[better], label[better], t is own
        return int((home & (pred == self.labels)).sum())

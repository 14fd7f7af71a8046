"""Serving many tasks from one backbone: load it once, attach adapters, switch tasks, predict, mix tasks in a batch.

Switching the active task sets one attribute of the backbone's :class:`~adaptkit.methods.TaskContext`; it never
rebuilds a module or reloads the backbone. In a mixed batch the backbone runs once and each sample goes through its
own task's adapter (gathered per sample, applied with batched matrix products) and its own head. Prediction with no
task name is :mod:`adaptkit.inference.routed`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator

import torch

from adaptkit.backbone import create_backbone, recorded_image_size
from adaptkit.checks import check_int
from adaptkit.devices import resolve_device
from adaptkit.errors import ArtifactError, BackboneError, ConfigError
from adaptkit.inference.gate import Gate
from adaptkit.inference.results import FrozenPrefix, ImageLike, LoadedTask, Prediction, _Host
from adaptkit.inference.routed import AutoPredict
from adaptkit.inference.router import Router
from adaptkit.inference.routing_stats import split_state
from adaptkit.methods import get_method, merge_lora
from adaptkit.registry import Registry, VersionRow
from adaptkit.trunk import run_suffix

__all__ = ["Predictor", "default_device"]

_log = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_HEAD_GATHER = 2 ** 22  # most head weights gathered per batch (16 MiB of float32) before heads run one by one


def _heads(feats: torch.Tensor, heads: list[torch.nn.Linear]) -> list[torch.Tensor]:
    """Sample b's logits under ``heads[b]`` (float32): heads of one size in one batched product, their weights
    gathered per sample, where that gather is small (many small heads cost one product, not one call each);
    otherwise one call per head over its samples."""
    groups: dict[int, list[int]] = {}
    for b, head in enumerate(heads):
        groups.setdefault(id(head), []).append(b)
    out: list[torch.Tensor | None] = [None] * len(heads)
    by_size: dict[int, list[list[int]]] = {}
    for members in groups.values():
        by_size.setdefault(heads[members[0]].out_features, []).append(members)
    for classes, parts in by_size.items():
        count = sum(len(p) for p in parts)
        if len(parts) > 1 and count * classes * feats.shape[-1] <= _HEAD_GATHER:
            weight = torch.stack([heads[p[0]].weight for p in parts])  # (T, C, d)
            bias = torch.stack([heads[p[0]].bias for p in parts])  # (T, C)
            order = [b for p in parts for b in p]
            which = torch.tensor([t for t, p in enumerate(parts) for _ in p], device=feats.device)
            rows = feats[order] if order != list(range(len(heads))) else feats
            logits = torch.baddbmm(bias[which].unsqueeze(1).to(rows.dtype), rows.unsqueeze(1),
                                   weight[which].transpose(1, 2).to(rows.dtype)).squeeze(1).float()
            for b, row in zip(order, logits.unbind(0), strict=True):
                out[b] = row
        else:
            for p in parts:
                logits = heads[p[0]](feats if len(p) == len(heads) else feats[p]).float()
                for b, row in zip(p, logits.unbind(0), strict=True):
                    out[b] = row
    return out  # type: ignore[return-value]


class Predictor(AutoPredict):
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
        self._gate = Gate()  # forward passes read the backbones' modules; loads and unloads change them

    # -- loading and switching ---------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Forget how refs resolve (after the registry changed); resident backbones and adapters stay."""
        with self._gate.writing():  # not while a load or an unload walks the same tables
            self._refs.clear()
            self._routers.clear()

    def load(self, ref: str) -> LoadedTask:
        """Attach the version ``ref`` (``task`` or ``task@N``) to its backbone, loading either if needed."""
        if ref in self._refs:
            return self._refs[ref]
        row = self.registry.get_version(ref)
        with self._gate.writing():  # waits for the forward passes running to finish; no new one starts meanwhile
            return self._load(ref, row)

    def _load(self, ref: str, row: VersionRow) -> LoadedTask:
        key = f"{row.task.name}@{row.version}"
        host = self._host_for(row)
        task = host.tasks.get(row.sha256)  # by content: a task removed and trained again is a new file
        if task is None:
            task = self._attach(host, row, key)
        self._refs[ref] = self._refs[key] = task
        return task

    def activate(self, ref: str) -> LoadedTask:
        """Make ``ref`` the task of calls that name none (and the active one of this thread's direct forward calls):
        one attribute set when it is resident. Calls that name their task never depend on it."""
        task = self._refs.get(ref) or self.load(ref)
        task.model.ctx.active = task.model.slot
        self.active = task
        return task

    def unload(self, ref: str, keep_sites: bool = False) -> None:
        """Detach a task's adapter from its backbone and free it (waiting for the forward passes running).

        Args:
            ref: ``task`` or ``task@N``.
            keep_sites: leave the sites it empties in the trunk (an empty site applies its base layer alone, as an
                unwrapped layer does) instead of walking every module of the trunk to unwrap them, which costs
                O(resident adapters): ViT-Ti on a CPU, 1.4 ms with 1 resident, 17 ms with 100, 30 ms with 200. What a
                cache evicting often wants.
        """
        task = self._refs.get(ref)
        if task is None:
            return
        with self._gate.writing():
            self._unload(task, keep_sites)

    def _unload(self, task: LoadedTask, keep_sites: bool) -> None:
        if keep_sites:
            for site in task.model.sites.values():
                site.remove(task.model.slot)
        else:
            task.model.detach_from_trunk()
        task.host.tasks = {k: v for k, v in task.host.tasks.items() if v is not task}
        for k in [k for k, v in self._refs.items() if v is task]:
            del self._refs[k]
        if self.active is task:
            self.active = None
        task.attached = False

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
        try:
            backbone = create_backbone(row.backbone.name, weights=row.backbone.weights, device=self.device,
                                       expect=fp, image_size=recorded_image_size(row.backbone.data_config))
        except BackboneError as exc:  # an imported task's backbone is the file's word: say where it came from
            source = (row.train or {}).get("imported_from")
            if not source or not exc.args:
                raise
            raise type(exc)(f"{row.ref} was imported from {source}: {exc.args[0]}") from exc
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
        for p in model.trainable_parameters():  # its own tensors only: the shared trunk's many tasks are not walked
            p.requires_grad_(False)  # a served task does not train (and its bank rows need no change checks)
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
        with self._resident([ref]) as (task,), self._autocast():
            if self.merge_lora and task.meta.method == "lora":
                return self._merged_model(task)(x).float()
            with task.model.ctx.using(active=task.model.slot):  # this call's task; other threads keep theirs
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
        with self._resident(refs) as tasks, self._autocast():
            out: list[torch.Tensor | None] = [None] * len(tasks)
            groups: dict[tuple[int, int], list[int]] = {}
            for i, t in enumerate(tasks):  # one pass per trunk (a full copy has its own) and per added tokens
                groups.setdefault((id(t.model.trunk), t.model.method.added_tokens()), []).append(i)
            for members in groups.values():
                self._run_group(x, tasks, members, out, prefix)
        return out  # type: ignore[return-value]

    def _run_group(self, x: torch.Tensor, tasks: list[LoadedTask], members: list[int], out: list,
                   prefix: FrozenPrefix | None) -> None:
        first = tasks[members[0]]
        ctx, trunk = first.model.ctx, first.model.trunk
        slots = tuple(sorted({tasks[i].model.slot for i in members}))
        whole = members == list(range(len(x)))  # no copy of the batch when the group is all of it
        if len(slots) == 1:  # one task: its own path, no per-sample gathers
            choice = ctx.using(active=slots[0])
        else:
            index = torch.tensor([slots.index(tasks[i].model.slot) for i in members], device=x.device)
            choice = ctx.using(slot_order=slots, sample_slots=index)
        with choice:  # this call's choice; other threads keep theirs
            if prefix is not None and prefix.trunk is trunk:
                feats = run_suffix(trunk, prefix.tokens if whole else prefix.tokens[members], prefix.start)
            else:
                feats = trunk(x if whole else x[members])
        for j, row in zip(members, _heads(feats, [tasks[i].model.head for i in members]), strict=True):
            out[j] = row

    def predict(self, images: list[ImageLike], ref: str | None = None, topk: int = 5) -> list[list[Prediction]]:
        """Top-k labels with probabilities for each image under one task."""
        check_int("topk", topk, 1)
        task = self._task(ref)
        return [self._topk(row, task, topk) for row in self.logits(self.preprocess(images, task), task.ref)]

    def predict_mixed(self, images: list[ImageLike], refs: list[str], topk: int = 5) -> list[list[Prediction]]:
        """Top-k predictions for images that each name their own task, in one backbone pass per backbone (tasks on
        backbones built at different input sizes in one batch each)."""
        check_int("topk", topk, 1)
        tasks = [self._task(r) for r in refs]
        if len(images) != len(tasks):
            raise ConfigError(f"{len(images)} images but {len(tasks)} task names: give one task per image")
        out: list[list[Prediction]] = [[] for _ in tasks]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(tasks):  # a backbone built at another size takes other inputs: one batch per size
            by_size.setdefault(tuple(t.host.backbone.data_config["input_size"]), []).append(i)
        for members in by_size.values():
            x = torch.cat([self.preprocess([images[i]], tasks[i]) for i in members])
            for i, row in zip(members, self.logits_mixed(x, [refs[i] for i in members]), strict=True):
                out[i] = self._topk(row, tasks[i], topk)
        return out

    # -- helpers -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _resident(self, refs: list[str | None]) -> Iterator[list[LoadedTask]]:
        """The tasks ``refs`` name (loaded first where needed), attached for as long as the block runs: an unload
        waits for it; one that came between resolving a task and entering is seen, and the task is loaded again."""
        while True:
            tasks = [self._task(r) for r in refs]
            with self._gate.reading():
                if all(t.attached for t in tasks):
                    yield tasks
                    return

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

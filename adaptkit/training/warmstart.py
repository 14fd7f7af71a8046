"""Warm starts: a new task begins from an earlier task's adapter instead of from the identity (forward transfer).

``--init-from TASK[@N]`` copies that version's method tensors into the new task (same backbone, method and settings,
or a clear error); its head is copied too when the classes are the same, else the new task gets a new head.
``--init-from auto`` picks the registered task whose data look most like the new data: the cosine similarity of the
mean frozen feature (the backbone's pooled output, no task applied) of a sample of the new training images against
each candidate's. A candidate's mean comes from the class means and counts stored in its adapter file where those
exist (tensors named ``...class_means`` and ``...class_counts``), else from one frozen pass over a sample of its own
data set. What was chosen, and every candidate's score, is recorded with the new version.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adaptkit.artifacts import ROUTING_PREFIX, AdapterMeta
from adaptkit.backbone import Backbone
from adaptkit.data import TransformedSubset, load_task_data
from adaptkit.errors import AdaptkitError, ConfigError, NotFoundError, param
from adaptkit.methods import Method, TaskModel, task_context
from adaptkit.registry import Registry, VersionRow

__all__ = ["AUTO", "SAMPLE", "WarmStart", "choose", "apply", "mean_feature"]

_log = logging.getLogger(__name__)
AUTO = "auto"
SAMPLE = 256  # images per data set for a mean feature: enough for a stable mean, one quick frozen pass


@dataclass
class WarmStart:
    """Where a task starts from: ``ref`` (None: a cold start that ``auto`` settled on) and the tensors to copy."""

    ref: str | None
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    classes: list[str] = field(default_factory=list)
    sha256: str | None = None
    auto: bool = False
    similarity: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    note: str = ""
    head_copied: bool = False

    def record(self) -> dict[str, Any]:
        """What is kept with the new version (JSON)."""
        out: dict[str, Any] = {"ref": self.ref, "sha256": self.sha256, "auto": self.auto,
                               "head": "copied" if self.head_copied else "new"}
        if self.auto:
            out.update(similarity=self.similarity, scores=self.scores)
        if self.note:
            out["note"] = self.note
        return out


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values))  # as the settings read back from a file (tuples become lists)


def _check_fits(ref: str, meta: AdapterMeta, backbone: Backbone, method: Method) -> None:
    if meta.backbone_fingerprint != backbone.fingerprint:
        raise ConfigError(f"{ref} was trained on backbone {meta.backbone} ({meta.backbone_fingerprint[:12]}), not on "
                          f"{backbone.name} ({backbone.fingerprint[:12]}): train with the backbone and weights it "
                          f"was trained on, or pick another {param('init_from')}")
    ours = _plain(method.config_dict())
    if meta.method != method.name or meta.method_config != ours:
        theirs = meta.method_config
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        settings = ", ".join(f"{k}={theirs.get(k)!r} (this run: {ours.get(k)!r})" for k in differ)
        raise ConfigError(f"{ref} is a {meta.method} adapter"
                          + (f" with {settings}" if meta.method == method.name else f", this run trains {method.name}")
                          + ": a warm start needs the same method and settings; pass "
                          + f"{param('method', meta.method)} and its settings, or drop {param('init_from')}")


def _from_version(registry: Registry, row: VersionRow, backbone: Backbone, method: Method) -> WarmStart:
    ref = f"{row.task.name}@{row.version}"
    state, meta = registry.load_version(row)
    state = {k: t for k, t in state.items() if not k.startswith(ROUTING_PREFIX)}  # statistics are not trained
    _check_fits(ref, meta, backbone, method)
    return WarmStart(ref=ref, state=state, classes=list(meta.classes), sha256=row.sha256)


def _eval_view(split: Dataset, eval_split: Dataset, n: int) -> Dataset:
    """The first ``n`` images of ``split`` through the eval transform (no augmentation in a mean feature)."""
    if isinstance(split, TransformedSubset) and isinstance(eval_split, TransformedSubset):
        return TransformedSubset(split.source, split.indices[:n], eval_split.transform)
    return torch.utils.data.Subset(split, range(min(n, len(split))))


@torch.no_grad()
def mean_feature(backbone: Backbone, images: Dataset, batch_size: int = 128) -> torch.Tensor:
    """The mean of the backbone's pooled features over ``images`` with no task applied: shape (d,)."""
    trunk: nn.Module = backbone.model
    total, count = None, 0
    with task_context(trunk).using():  # no task applied
        for x, _ in DataLoader(images, batch_size=batch_size, shuffle=False):
            f = trunk(x.to(backbone.device)).float().sum(0)
            total, count = (f if total is None else total + f), count + len(x)
    if total is None:
        raise ConfigError("no images to compute a mean feature from: the data set is empty")
    return total.cpu() / count


def _stored_mean(state: dict[str, torch.Tensor], dim: int) -> torch.Tensor | None:
    """The mean frozen feature from class statistics kept in an adapter file, if it has them."""
    means, counts = state.get(f"{ROUTING_PREFIX}means"), state.get(f"{ROUTING_PREFIX}counts")
    if means is None or counts is None or means.ndim != 2 or means.shape[1] != dim or len(counts) != len(means):
        return None
    w = counts.double().clamp(min=0)
    return ((means.double() * w[:, None]).sum(0) / w.sum().clamp(min=1)).float()


def _candidate_mean(registry: Registry, row: VersionRow, backbone: Backbone) -> torch.Tensor | None:
    try:
        state, _ = registry.load_version(row)
        stored = _stored_mean(state, backbone.embed_dim)
        if stored is not None:
            return stored
        data = load_task_data(row.task.dataset, backbone.data_config, download=False, augment=False)
        return mean_feature(backbone, _eval_view(data.train, data.val, SAMPLE))
    except AdaptkitError as exc:  # its file or data set is not at hand: it cannot be compared, the rest can
        _log.warning("warm start: skipping %s@%s (%s)", row.task.name, row.version, exc)
        return None


def _auto(registry: Registry, backbone: Backbone, method: Method, data: Any) -> WarmStart:
    wanted = _plain(method.config_dict())
    rows = [t.default for t in registry.tasks()]
    rows = [v for v in rows if v is not None and v.backbone.fingerprint == backbone.fingerprint
            and v.method == method.name and v.config == wanted]
    if not rows:
        return WarmStart(ref=None, auto=True, note=f"no registered task on this backbone with method {method.name} "
                                                   "and the same settings: a cold start")
    new = mean_feature(backbone, _eval_view(data.train, data.val, SAMPLE))
    scores = {}
    for row in rows:
        mean = _candidate_mean(registry, row, backbone)
        if mean is not None:
            scores[f"{row.task.name}@{row.version}"] = float(torch.cosine_similarity(new, mean, dim=0))
    if not scores:
        return WarmStart(ref=None, auto=True, note="no candidate's statistics or data could be read: a cold start")
    best = max(scores, key=scores.get)
    chosen = _from_version(registry, registry.get_version(best), backbone, method)
    chosen.auto, chosen.similarity, chosen.scores = True, scores[best], dict(sorted(scores.items()))
    return chosen


def choose(init_from: str, *, registry: Registry, backbone: Backbone, method: Method, data: Any) -> WarmStart:
    """Resolve ``--init-from``: a version (``TASK`` or ``TASK@N``) or ``auto``; checked before any training.

    Args:
        init_from: ``TASK``, ``TASK@N`` or ``auto`` (a task named "auto" is reached as ``auto@N``).
        registry, backbone, method: where the source lives, and what the new task trains (they must match it).
        data: the new task's data (``auto`` compares a sample of its training images).

    Returns:
        The warm start, with the source's tensors; ``ref`` None when ``auto`` found no compatible task.
    """
    if init_from.strip().lower() == AUTO:
        return _auto(registry, backbone, method, data)
    try:
        row = registry.get_version(init_from.strip())
    except NotFoundError as exc:
        raise NotFoundError(f"{param('init_from', init_from)}: {exc} (`adaptkit list` shows the tasks)") from exc
    return _from_version(registry, row, backbone, method)


def apply(task: TaskModel, warm: WarmStart, classes: list[str]) -> None:
    """Copy the warm start's method tensors into ``task`` (and its head when ``classes`` are the source's)."""
    if warm.ref is None:
        return
    warm.head_copied = list(classes) == list(warm.classes)
    own = task.state()
    new_head = not warm.head_copied
    merged = {k: v if k.startswith("head.") and new_head else warm.state.get(k, v) for k, v in own.items()}
    absent = sorted(k for k in own if not k.startswith("head.") and k not in warm.state)
    if absent:  # other tensors in the file (statistics kept for routing) are not the method's and stay behind
        raise ConfigError(f"{warm.ref}'s tensors do not match this task's ({absent[:2]} missing): it cannot be a warm "
                          f"start here; drop {param('init_from')}")
    task.load_state(merged)

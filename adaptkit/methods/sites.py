"""Task sites and the task context: the per-call choice of task, the sites that read it, and finding them.

A *site* wraps one layer of the backbone (``self.base_layer``, as in PEFT) and holds, in a ``ModuleDict``, the
modules that each attached task adds there. Every site of a backbone reads one :class:`TaskContext`, so switching
the active task is one attribute assignment, whatever the number of tasks or layers. In a mixed batch the context
carries one slot index per sample and each site applies every sample's own task with batched matrix products.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["TaskContext", "TaskSite", "find_site", "put_rows", "task_context", "unwrap"]


@dataclasses.dataclass(frozen=True)
class _CallState:
    """What one call applies: the active slot, or a mixed batch's slot order and per-sample slots (with the rows
    each presence pattern selects, cached for that batch only)."""

    active: str | None = None
    slot_order: tuple[str, ...] = ()
    sample_slots: torch.Tensor | None = None
    rows: dict = dataclasses.field(default_factory=dict, compare=False)


_IDLE = _CallState()


class TaskContext:
    """Which task the sites of one backbone apply: ``active`` (one slot) or ``sample_slots`` (a mixed batch).

    That choice belongs to the calling thread (and asyncio task): it is kept in a :class:`contextvars.ContextVar`,
    so concurrent calls on one backbone, each with its own task or mix, never see each other's. Set it for a block
    with :meth:`using`; the attributes can be assigned too (they change the calling thread's choice only).
    """

    def __init__(self) -> None:
        self._state: contextvars.ContextVar[_CallState] = contextvars.ContextVar("adaptkit_task_context",
                                                                                 default=_IDLE)
        self.generation = 0  # bumped when a slot is added or removed, so cached banks are rebuilt
        self._next = 0
        self._slot_lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Copies and pickles take the copying thread's choice (a ContextVar itself cannot be copied)."""
        return {"state": self._state.get(), "generation": self.generation, "next": self._next}

    def __setstate__(self, saved: dict) -> None:
        self.__init__()
        self.generation, self._next = saved["generation"], saved["next"]
        state = saved["state"]
        self._state.set(dataclasses.replace(state, rows={}))

    @property
    def active(self) -> str | None:
        return self._state.get().active

    @active.setter
    def active(self, slot: str | None) -> None:
        self._state.set(dataclasses.replace(self._state.get(), active=slot))

    @property
    def slot_order(self) -> tuple[str, ...]:
        """The slots a mixed batch indexes into."""
        return self._state.get().slot_order

    @slot_order.setter
    def slot_order(self, slots: tuple[str, ...]) -> None:
        self._state.set(dataclasses.replace(self._state.get(), slot_order=tuple(slots), rows={}))

    @property
    def sample_slots(self) -> torch.Tensor | None:
        """(B,) int64 indices into ``slot_order``, one per sample of a mixed batch; None outside one."""
        return self._state.get().sample_slots

    @sample_slots.setter
    def sample_slots(self, index: torch.Tensor | None) -> None:
        self._state.set(dataclasses.replace(self._state.get(), sample_slots=index, rows={}))

    @contextlib.contextmanager
    def using(self, active: str | None = None, slot_order: tuple[str, ...] = (),
              sample_slots: torch.Tensor | None = None) -> Iterator[None]:
        """Apply ``active`` (or the mixed batch ``slot_order`` / ``sample_slots``) inside the block, in this thread
        only; the previous choice comes back after it."""
        token = self._state.set(_CallState(active, tuple(slot_order), sample_slots, {}))
        try:
            yield
        finally:
            self._state.reset(token)

    def new_slot(self) -> str:
        """A slot name not used before on this backbone (ModuleDict keys: no dots)."""
        with self._slot_lock:
            self._next += 1
            return f"s{self._next}"

    def rows(self, present: tuple[bool, ...]) -> torch.Tensor | None:
        """The samples of the mixed batch whose slot has a module at a site (``present``: one flag per slot of
        ``slot_order``), so that a site works on those rows only; None when every sample has one.

        Sites with the same pattern share one answer per batch (one look-up, one device sync, per pattern).
        """
        state = self._state.get()
        idx = state.sample_slots
        if all(present) or idx is None:
            return None
        cache = state.rows
        if present not in cache:
            rows = torch.tensor(present, device=idx.device)[idx].nonzero().squeeze(1)
            cache[present] = None if rows.numel() == idx.numel() else rows
        return cache[present]


def put_rows(y: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``y`` with ``values`` at ``rows``: written in place when no autograd graph records ``y`` (serving), so the
    samples without a module here cost nothing."""
    return y.index_copy(0, rows, values) if y.requires_grad else y.index_copy_(0, rows, values)


def task_context(trunk: nn.Module) -> TaskContext:
    """The one context of a backbone, made on first use and kept on the module."""
    ctx = trunk.__dict__.get("_adaptkit_ctx")
    if ctx is None:
        ctx = TaskContext()
        trunk.__dict__["_adaptkit_ctx"] = ctx
    return ctx


class TaskSite(nn.Module):
    """A wrapper around ``base_layer`` that adds the active task's module(s), or nothing."""

    def __init__(self, base_layer: nn.Module, ctx: TaskContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.tasks = nn.ModuleDict()
        self.ctx = ctx  # plain attribute, not a submodule: shared by every site
        self._bank: tuple[Any, Any] | None = None

    @property
    def layer(self) -> nn.Module:
        """The wrapped layer itself: ``base_layer`` may be a site of another kind around it."""
        layer = self.base_layer
        while isinstance(layer, TaskSite):
            layer = layer.base_layer
        return layer

    def add(self, slot: str, module: nn.Module) -> None:
        self.tasks[slot] = module
        self.ctx.generation += 1

    def remove(self, slot: str) -> None:
        if slot in self.tasks:
            del self.tasks[slot]
            self.ctx.generation += 1

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        ctx = self.ctx
        if ctx.sample_slots is not None:
            return self.forward_mixed(x, ctx.sample_slots, self.bank(), *args, **kwargs)
        module = self.tasks[ctx.active] if ctx.active is not None and ctx.active in self.tasks else None
        return self.forward_task(x, module, *args, **kwargs)

    def bank(self) -> Any:
        """This site's tensors stacked over ``ctx.slot_order`` (zeros where a slot has no module), cached (one
        entry, read and replaced whole, so concurrent batches of other mixes rebuild it but never mix it up)."""
        key = (self.ctx.slot_order, self.ctx.generation)
        bank = self._bank
        if bank is None or bank[0] != key:
            bank = (key, self.build_bank([self.tasks[s] if s in self.tasks else None for s in key[0]]))
            self._bank = bank
        return bank[1]

    @abstractmethod
    def forward_task(self, x: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Apply the base layer and ``module`` (None: the base layer alone)."""

    @abstractmethod
    def forward_mixed(self, x: torch.Tensor, idx: torch.Tensor, bank: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Apply the base layer and, per sample, the module of slot ``idx[b]``."""

    @abstractmethod
    def build_bank(self, modules: list[nn.Module | None]) -> Any:
        """Stack the modules' tensors for :meth:`forward_mixed`."""


def _canonical_get(root: nn.Module, path: str) -> nn.Module:
    """Get the module at ``path`` as if no site were there (sites are looked through to their base layer)."""
    module = root
    for part in path.split(".") if path else []:
        if isinstance(module, TaskSite):
            module = module.base_layer
        module = getattr(module, part)
    return module


def find_site(root: nn.Module, path: str, site_class: type[TaskSite], ctx: TaskContext) -> TaskSite:
    """Return the site of ``site_class`` at ``path``, wrapping the layer there if it is not wrapped yet."""
    parent_path, _, name = path.rpartition(".")
    parent = _canonical_get(root, parent_path)
    if isinstance(parent, TaskSite):
        parent = parent.base_layer
    layer = getattr(parent, name)
    while isinstance(layer, TaskSite):  # a site of another kind may already wrap this layer
        if isinstance(layer, site_class):
            return layer
        parent, name, layer = layer, "base_layer", layer.base_layer
    site = site_class(layer, ctx)
    setattr(parent, name, site)
    return site


def unwrap(root: nn.Module, only_empty: bool = False) -> nn.Module:
    """Replace every site under ``root`` (in place; with ``only_empty``, those with no task) by its base layer."""
    for name, child in list(root.named_children()):
        while isinstance(child, TaskSite) and not (only_empty and len(child.tasks)):
            child = child.base_layer
        setattr(root, name, child)
        unwrap(child, only_empty)
    return root

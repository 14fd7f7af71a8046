"""Task sites and the task context: the per-call choice of task, the sites that read it, and finding them.

A *site* wraps one layer of the backbone (``self.base_layer``, as in PEFT) and holds, in a ``ModuleDict``, the
modules that each attached task adds there. Every site of a backbone reads one :class:`TaskContext`, so switching
the active task is one attribute assignment, whatever the number of tasks or layers. In a mixed batch the context
carries one slot index per sample and each site applies every sample's own task with batched matrix products.

For mixed batches each site keeps a *bank*: its tasks' tensors stacked in preallocated tensors, one row per task (the
context gives every attached slot a row, the same at every site; rows of removed tasks are reused). A task's row is
written the first time a mixed batch uses it and again only if its tensors change, so a batch gathers its samples'
rows by index and builds nothing, however many tasks are attached or mixed (as S-LoRA's and Punica's adapter pools
do for language models). A row is written again when its module's trainable tensors changed in place (their version
counters: an optimiser step) or :meth:`TaskModel.load_state` replaced them; a frozen tensor changed in place by hand
is not seen. The bank is a second copy of each adapter that has been in a mixed batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import heapq
import threading
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from adaptkit.families import bias_flag_patch

__all__ = ["Bank", "TaskContext", "TaskSite", "find_site", "put_rows", "task_context", "unwrap"]


@dataclasses.dataclass(frozen=True)
class _CallState:
    """What one call applies: the active slot, or a mixed batch's slot order and per-sample slots (with the samples'
    bank rows and the rows each presence pattern selects, cached for that batch only)."""

    active: str | None = None
    slot_order: tuple[str, ...] = ()
    sample_slots: torch.Tensor | None = None
    rows: dict = dataclasses.field(default_factory=dict, compare=False)


_IDLE = _CallState()
_ALONE_MAX = 65536  # single-task states kept per context before the cache starts again


class TaskContext:
    """Which task the sites of one backbone apply: ``active`` (one slot) or ``sample_slots`` (a mixed batch).

    That choice belongs to the calling thread (and asyncio task): it is kept in a :class:`contextvars.ContextVar`,
    so concurrent calls on one backbone, each with its own task or mix, never see each other's. Set it for a block
    with :meth:`using`; the attributes can be assigned too (they change the calling thread's choice only).
    """

    def __init__(self) -> None:
        self._state: contextvars.ContextVar[_CallState] = contextvars.ContextVar("adaptkit_task_context",
                                                                                 default=_IDLE)
        self._alone: dict[str | None, _CallState] = {None: _IDLE}  # slot -> its one frozen single-task state
        self._grad_state: _CallState | None = None  # the last choice of a forward pass recording gradients
        self._next = 0
        self._slot_lock = threading.Lock()
        self.bank_lock = threading.Lock()  # held while a site writes rows of its bank
        self._row_of: dict[str, int] = {}  # slot -> its row in every site's bank
        self._holders: Counter[str] = Counter()  # slot -> how many sites hold a module of it
        self._free: list[int] = []  # rows given back, lowest first
        self._rows = 1  # rows ever handed out, after row 0: no task's, zeros at every site

    def __getstate__(self) -> dict:
        """Copies and pickles take the copying thread's choice (a ContextVar itself cannot be copied)."""
        return {"state": self._state.get(), "next": self._next, "row_of": dict(self._row_of),
                "holders": Counter(self._holders), "free": list(self._free), "rows": self._rows}

    def __setstate__(self, saved: dict) -> None:
        self.__init__()
        self._next, self._rows = saved["next"], saved["rows"]
        self._row_of, self._holders, self._free = saved["row_of"], saved["holders"], saved["free"]
        state = saved["state"]
        self._state.set(self._alone_state(state.active) if state.sample_slots is None and not state.slot_order
                        else dataclasses.replace(state, rows={}))

    @property
    def active(self) -> str | None:
        return self._state.get().active

    @active.setter
    def active(self, slot: str | None) -> None:
        state = self._state.get()
        if state.sample_slots is None and not state.slot_order:  # a task alone: its state is built once per slot
            self._state.set(self._alone_state(slot))
        else:
            self._state.set(dataclasses.replace(state, active=slot))

    def _alone_state(self, slot: str | None) -> _CallState:
        """The state of ``slot`` applied alone: frozen and shared by every thread that sets it (its ``rows`` cache
        is written by mixed batches only), so switching builds nothing."""
        state = self._alone.get(slot)
        if state is None:
            if len(self._alone) > _ALONE_MAX:  # slots of tasks that attached no site are never released
                self._alone = {None: _IDLE}
            state = self._alone[slot] = _CallState(slot)
        return state

    def state(self) -> _CallState:
        """This thread's whole choice, read once (what a site's forward reads).

        A thread that chose nothing and is running a backward pass gets the choice of the last forward pass that
        recorded gradients: activation checkpointing recomputes blocks in the backward pass, which on CUDA runs in
        the autograd engine's own thread, and the recomputed blocks must apply the task the forward pass applied.
        """
        state = self._state.get()
        if state is _IDLE and self._grad_state is not None and torch._C._current_graph_task_id() != -1:
            return self._grad_state
        return state

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
        alone = sample_slots is None and not slot_order
        token = self._state.set(self._alone_state(active) if alone else
                                _CallState(active, tuple(slot_order), sample_slots, {}))
        try:
            yield
        finally:
            self._state.reset(token)

    def new_slot(self) -> str:
        """A slot name not used before on this backbone (ModuleDict keys: no dots)."""
        with self._slot_lock:
            self._next += 1
            return f"s{self._next}"

    def claim(self, slot: str) -> int:
        """A site takes a module of ``slot``: the slot's bank row (a new one for its first site)."""
        with self._slot_lock:
            self._holders[slot] += 1
            row = self._row_of.get(slot)
            if row is None:
                if self._free:
                    row = heapq.heappop(self._free)
                else:
                    row, self._rows = self._rows, self._rows + 1
                self._row_of[slot] = row
            return row

    def release(self, slot: str) -> None:
        """A site gave up its module of ``slot``; after the last one, the slot's row can go to another slot."""
        with self._slot_lock:
            self._holders[slot] -= 1
            if self._holders[slot] <= 0:
                del self._holders[slot]
                self._alone.pop(slot, None)
                heapq.heappush(self._free, self._row_of.pop(slot))

    def row(self, slot: str) -> int | None:
        """The bank row of ``slot`` (None: no site holds a module of it)."""
        return self._row_of.get(slot)

    def sample_rows(self) -> torch.Tensor:
        """(B,) the bank row of each sample's task in the mixed batch (row 0, which holds zeros everywhere, for a
        task with no module at any site)."""
        state = self._state.get()
        rows = state.rows.get("sample_rows")
        if rows is None:
            order = [self._row_of.get(s, 0) for s in state.slot_order]
            rows = state.rows["sample_rows"] = torch.tensor(order, device=state.sample_slots.device)[state.sample_slots]
        return rows

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
        self._bank: dict[str, torch.Tensor] = {}  # name -> (rows, ...) tensor, every row padded to the widest
        # row -> the module written there, its tensors and their version counters then (a change in place is seen),
        # and its row_info
        self._written: dict[int, tuple[nn.Module, list[torch.Tensor], tuple[int, ...], Any]] = {}

    @property
    def layer(self) -> nn.Module:
        """The wrapped layer itself: ``base_layer`` may be a site of another kind around it."""
        layer = self.base_layer
        while isinstance(layer, TaskSite):
            layer = layer.base_layer
        return layer

    def add(self, slot: str, module: nn.Module) -> None:
        if slot not in self.tasks:
            self.ctx.claim(slot)
        self.tasks[slot] = module

    def remove(self, slot: str) -> None:
        if slot in self.tasks:
            del self.tasks[slot]
            self.forget(slot)
            self.ctx.release(slot)

    def forget(self, slot: str) -> None:
        """Clear the bank row of ``slot`` here (its module left, or its tensors were replaced): zeros, as a row of
        no task, until a mixed batch writes it again."""
        row = self.ctx.row(slot)
        if row is not None and self._written.pop(row, None) is not None:
            with self.ctx.bank_lock, _bank_mode():
                for pool in self._bank.values():
                    if row < pool.shape[0]:
                        pool[row].zero_()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        state = self.ctx.state()
        if state is not _IDLE and torch.is_grad_enabled():  # a backward pass may recompute this (checkpointing)
            self.ctx._grad_state = state
        if state.sample_slots is not None:
            return self.forward_mixed(x, self.ctx.sample_rows(), self.bank(), *args, **kwargs)
        module = self.tasks._modules.get(state.active) if state.active is not None else None
        return self.forward_task(x, module, *args, **kwargs)

    def bank(self) -> Bank | None:
        """The bank for this call's mixed batch (None when no task of it has a module here): the rows of its tasks
        written where missing or out of date, then the bank's tensors as they stand. A batch reads only its own
        tasks' rows; another batch writes those only if the task's tensors changed, and a bank that must grow is
        copied, so a batch holding the old tensors reads them unchanged."""
        ctx = self.ctx
        modules = [self.tasks._modules.get(s) for s in ctx.slot_order]
        if not any(m is not None for m in modules):
            return None
        infos: list[Any] = [None] * len(modules)
        with ctx.bank_lock, _bank_mode():
            for i, (slot, module) in enumerate(zip(ctx.slot_order, modules, strict=True)):
                if module is None:
                    continue
                row = ctx.row(slot)
                seen = self._written.get(row)
                if seen is None or seen[0] is not module or tuple(p._version for p in seen[1]) != seen[2]:
                    self._write(row, self.bank_row(module))
                    params = [p for p in module.parameters() if p.requires_grad]  # what an optimiser may change
                    seen = self._written[row] = (module, params, tuple(p._version for p in params),
                                                 self.row_info(module))
                infos[i] = seen[3]
            top = max(ctx.row(s) or 0 for s in ctx.slot_order)  # every sample's row is there, written or zero
            tensors = {name: self._room(name, top) for name in list(self._bank)}
        return Bank(tensors, infos)

    def _write(self, row: int, values: dict[str, torch.Tensor]) -> None:
        """Put one task's tensors in row ``row``, zero-padded (a tensor too small for it is replaced by a larger
        copy); the row's other tensors are zeroed."""
        for name, pool in self._bank.items():
            if name not in values and row < pool.shape[0]:
                pool[row].zero_()
        for name, value in values.items():
            target = self._room(name, row, value)[row]
            target.zero_()
            target[tuple(slice(0, n) for n in value.shape)] = value.to(target.dtype)

    def _room(self, name: str, row: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """Bank tensor ``name`` with a row ``row`` and rows as wide as ``like``: a larger zero-padded copy (twice the
        rows, or ``row + 1``) when it has too few or too narrow rows."""
        pool = self._bank.get(name)
        if pool is None:
            shape, count = list(like.shape), max(row + 1, 4)
        else:
            shape = list(pool.shape[1:]) if like is None else [max(p, v) for p, v in zip(pool.shape[1:], like.shape,
                                                                                          strict=True)]
            count = pool.shape[0] if row < pool.shape[0] else max(row + 1, 2 * pool.shape[0])
            if count == pool.shape[0] and shape == list(pool.shape[1:]):
                return pool
        grown = (like if pool is None else pool).new_zeros(count, *shape)
        if pool is not None:
            grown[tuple(slice(0, n) for n in pool.shape)] = pool
        self._bank[name] = grown
        return grown

    @abstractmethod
    def forward_task(self, x: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Apply the base layer and ``module`` (None: the base layer alone)."""

    @abstractmethod
    def forward_mixed(self, x: torch.Tensor, idx: torch.Tensor, bank: Bank | None, *args: Any,
                      **kwargs: Any) -> torch.Tensor:
        """Apply the base layer and, per sample b, the module whose bank row is ``idx[b]`` (``bank``: None when no
        task of the batch has a module here)."""

    @abstractmethod
    def bank_row(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s tensors as one row of the bank, by name (each padded with zeros to the widest row)."""

    def row_info(self, module: nn.Module) -> Any:
        """What a mixed pass needs to know of ``module`` besides its tensors (its rank, its kind ...), read once when
        its row is written: :attr:`Bank.infos`. Not None."""
        return True


def _bank_mode() -> contextlib.ExitStack:
    """Bank tensors are plain tensors outside autograd, whether the pass that writes them runs in inference mode or
    not (an inference-mode tensor could not be written outside it, by an unload)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


@dataclasses.dataclass(frozen=True)
class Bank:
    """What a site's mixed pass reads: ``tensors`` (name -> one row per bank row, indexed by the samples' rows) and
    ``infos``, the :meth:`TaskSite.row_info` of the site's module of each slot of the batch (None where the slot has
    no module here; its row here is all zeros, since a site zeroes a row when its module leaves)."""

    tensors: dict[str, torch.Tensor]
    infos: list[Any]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def present(self, keep: Any = None) -> tuple[bool, ...]:
        """One flag per slot of the batch: it has a module here (and ``keep(info)`` holds)."""
        if keep is None:
            return tuple(i is not None for i in self.infos)
        return tuple(i is not None and keep(i) for i in self.infos)

    def held(self) -> list[Any]:
        """The infos of the batch's modules at this site."""
        return [i for i in self.infos if i is not None]


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
    patch = bias_flag_patch(root, path)  # an attention that would call around the layer calls it while wrapped
    if patch is not None:
        owner, flag, old = patch
        owner.__dict__.setdefault("_adaptkit_restore", {}).setdefault(flag, old)  # put back when no site is left
        setattr(owner, flag, True)
    setattr(parent, name, site)
    return site


def unwrap(root: nn.Module, only_empty: bool = False) -> nn.Module:
    """Replace every site under ``root`` (in place; with ``only_empty``, those with no task) by its base layer."""
    for name, child in list(root.named_children()):
        while isinstance(child, TaskSite) and not (only_empty and len(child.tasks)):
            child = child.base_layer
        setattr(root, name, child)
        unwrap(child, only_empty)
    restore = root.__dict__.get("_adaptkit_restore")
    if restore and not any(isinstance(c, TaskSite) for c in root.children()):
        for flag, old in root.__dict__.pop("_adaptkit_restore").items():
            setattr(root, flag, old)
    return root

"""The task context: which task the sites of one backbone apply, chosen per call (thread or asyncio task).

Every site of a backbone reads one :class:`TaskContext`, so switching the active task is one attribute assignment,
whatever the number of tasks or layers. In a mixed batch it carries one slot index per sample, and it hands every
attached slot its row in the sites' banks (:mod:`adaptkit.methods.sites`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import heapq
import threading
from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["TaskContext", "task_context"]


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
        """This thread's whole choice, read once by a site's forward.

        A thread that chose nothing and is running a backward pass gets the choice of the last forward pass that
        recorded gradients (kept here when a forward pass that records them reads its choice): activation
        checkpointing recomputes blocks in the backward pass, which on CUDA runs in the autograd engine's own thread,
        and the recomputed blocks must apply the task the forward pass applied.
        """
        state = self._state.get()
        if state is _IDLE:
            if self._grad_state is not None and torch._C._current_graph_task_id() != -1:
                return self._grad_state
        elif torch.is_grad_enabled():
            self._grad_state = state
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


def task_context(trunk: nn.Module) -> TaskContext:
    """The one context of a backbone, made on first use and kept on the module."""
    ctx = trunk.__dict__.get("_adaptkit_ctx")
    if ctx is None:
        ctx = TaskContext()
        trunk.__dict__["_adaptkit_ctx"] = ctx
    return ctx

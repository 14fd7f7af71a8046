"""The shared machinery of every method: task sites, the task context, and a task on a backbone.

A *site* wraps one layer of the backbone (``self.base_layer``, as in PEFT) and holds, in a ``ModuleDict``, the
modules that each attached task adds there. Every site of a backbone reads one :class:`TaskContext`, so switching
the active task is one attribute assignment, whatever the number of tasks or layers. In a mixed batch the context
carries one slot index per sample and each site applies every sample's own task with batched matrix products.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from adaptkit.errors import ConfigError, param

__all__ = ["TaskContext", "TaskSite", "TaskModel", "Method", "find_site", "plain_copy", "put_rows", "task_context",
           "unwrap"]


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


class TaskModel(nn.Module):
    """One task on a backbone: the (shared, frozen) trunk, the method's modules in its sites, and the head.

    ``parts`` maps a stable name (the site's path plus the module's role, e.g. ``blocks.0.mlp.adapter``) to the
    module this task added there; with the head they are exactly the task's trainable state.
    """

    def __init__(self, trunk: nn.Module, ctx: TaskContext, slot: str, method: Method, head: nn.Linear,
                 parts: dict[str, nn.Module], sites: dict[str, TaskSite]) -> None:
        super().__init__()
        self.trunk, self.head, self.slot, self.method = trunk, head, slot, method
        self.ctx = ctx
        self.parts = parts  # plain dicts: the modules are registered in the trunk's sites already
        self.sites = sites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ctx.active = self.slot
        return self.head(self.trunk(x))

    def train(self, mode: bool = True) -> TaskModel:
        """Train mode reaches only what trains: a frozen trunk keeps its eval-mode behaviour."""
        self.training = mode
        self.head.train(mode)
        for module in self.parts.values():
            module.train(mode)
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        for module in [*self.parts.values(), self.head]:
            yield from module.parameters()

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for prefix, module in [*self.parts.items(), ("head", self.head)]:
            for name, p in module.named_parameters():
                yield f"{prefix}.{name}", p

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def state(self) -> dict[str, torch.Tensor]:
        """The task's tensors by stable name: the only thing written to its adapter file."""
        out = {}
        for prefix, module in [*self.parts.items(), ("head", self.head)]:
            for name, t in module.state_dict().items():
                out[f"{prefix}.{name}"] = t.detach()
        return out

    def load_state(self, state: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load exactly the tensors :meth:`state` names; any missing, extra or misshapen tensor is an error.

        With ``assign`` the given tensors become the task's parameters as they are (no copy): the fast path for
        a task built on the meta device by :meth:`Method.attach` with ``state``.
        """
        expected = self.state()
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise ConfigError(f"adapter state does not match its method: missing {missing[:3]}, unexpected {extra[:3]}")
        bad = [k for k, t in expected.items() if t.shape != state[k].shape]
        if bad:
            raise ConfigError(f"adapter tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, "
                              f"expected {tuple(expected[bad[0]].shape)}")
        for prefix, module in [*self.parts.items(), ("head", self.head)]:
            own = {k[len(prefix) + 1:]: t for k, t in state.items() if k.startswith(prefix + ".")}
            module.load_state_dict(own, assign=assign)

    def detach_from_trunk(self) -> None:
        """Take this task's modules out of the shared trunk's sites; sites left empty are removed."""
        for site in self.sites.values():
            site.remove(self.slot)
        unwrap(self.trunk, only_empty=True)


class Method(ABC):
    """A way to adapt a frozen backbone to a task. Subclasses set ``name`` and ``config_class``."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    takes_blocks: ClassVar[bool] = True  # False where the method puts nothing in the blocks (the linear probe)

    def __init__(self, config: Any = None, blocks: int | None = None) -> None:
        """A method with its settings.

        Args:
            config: the method's own settings (its ``config_class``; None: the defaults).
            blocks: put the method's modules only in the last ``blocks`` blocks (None: every block), so the
                backward pass stops there and the frozen blocks before them can be cached.
        """
        self.config = config if config is not None else self.config_class()
        if blocks is not None:
            if not self.takes_blocks:
                raise ConfigError(f"{self.name} puts nothing in the blocks: {param('blocks')} does not apply to it; "
                                  "drop it")
            if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
                raise ConfigError(f"blocks must be a positive number of blocks, got {blocks!r}")
        self.blocks = blocks

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Method:
        values = dict(values)
        blocks = values.pop("blocks", None)
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(f"unknown {cls.name} setting(s) {unknown}; known: {sorted(fields | {'blocks'})}")
        return cls(cls.config_class(**values), blocks=blocks)

    def config_dict(self) -> dict[str, Any]:
        """The method's settings as recorded with a version; ``blocks`` only when set, so older files read the same."""
        values = dataclasses.asdict(self.config)
        return values if self.blocks is None else {**values, "blocks": self.blocks}

    def block_indices(self, trunk: nn.Module) -> range:
        """The indices of the blocks this method puts its modules in: every block, or the last ``blocks``."""
        depth = len(trunk.blocks)
        if self.blocks is None:
            return range(depth)
        if self.blocks > depth:
            raise ConfigError(f"blocks={self.blocks} but the backbone has {depth} blocks: pick 1 to {depth}")
        return range(depth - self.blocks, depth)

    def added_tokens(self) -> int:
        """How many tokens the method adds to the sequence (VPT's prompts): a mixed batch runs the samples of tasks
        that add the same number in one pass, so no sample pays for another task's longer sequence."""
        return 0

    def attach(self, trunk: nn.Module, num_classes: int, slot: str | None = None,
               state: dict[str, torch.Tensor] | None = None) -> TaskModel:
        """Add this method's modules for a new task to ``trunk`` and return the task with a new head.

        Args:
            trunk: the backbone (a timm ViT with ``num_classes=0``); several tasks may share it.
            num_classes: the size of the task's head.
            slot: the task's key in the backbone's sites (default: a new unique one).
            state: saved tensors to use as the task's parameters; the modules are then built on the meta
                device (no allocation, no initialisation) and take these tensors as they are.
        """
        if num_classes < 1:
            raise ConfigError(f"a task needs at least one class, got {num_classes}")
        ctx = task_context(trunk)
        slot = slot or ctx.new_slot()
        with torch.device("meta") if state is not None else contextlib.nullcontext():
            trunk, parts, sites = self.inject(trunk, ctx, slot)
            head = nn.Linear(int(trunk.num_features), num_classes)
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        task = TaskModel(trunk, ctx, slot, self, head, parts, sites)
        if state is not None:
            try:
                task.load_state(state, assign=True)
            except (ConfigError, RuntimeError):
                task.detach_from_trunk()
                raise
            return task
        device = next(trunk.parameters()).device
        for module in [*parts.values(), head]:
            module.to(device)
        return task

    @abstractmethod
    def inject(self, trunk: nn.Module, ctx: TaskContext,
               slot: str) -> tuple[nn.Module, dict[str, nn.Module], dict[str, TaskSite]]:
        """Add modules for ``slot``; return the trunk to run, the parts by stable name, and the sites used."""


def plain_copy(trunk: nn.Module) -> nn.Module:
    """A copy of ``trunk`` with every site and the task context removed: the backbone alone."""
    own = unwrap(copy.deepcopy(trunk))
    own.__dict__.pop("_adaptkit_ctx", None)
    return own


def private_trunk(trunk: nn.Module) -> nn.Module:
    """A trainable plain copy of ``trunk`` (for methods that train the backbone itself)."""
    return plain_copy(trunk).requires_grad_(True)

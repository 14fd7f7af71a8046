"""A task on a backbone and the method that makes it: :class:`TaskModel` and the :class:`Method` base class.

A method adds its modules to the backbone's task sites (:mod:`adaptkit.methods.sites`, re-exported here) and
gives the task a head; the task's trainable state is exactly those modules and the head.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from adaptkit.errors import ConfigError, param
from adaptkit.families import family_of
from adaptkit.methods.sites import TaskContext, TaskSite, find_site, put_rows, task_context, unwrap
from adaptkit.methods.skeleton import skeleton

# TaskContext, TaskSite, find_site, put_rows, task_context and unwrap live in methods/sites.py; they stay importable
# from here (listed in __all__).

__all__ = ["TaskContext", "TaskSite", "TaskModel", "Method", "find_site", "plain_copy", "put_rows", "task_context",
           "unwrap"]


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
        if assign:
            self._assign(state)
        else:
            for prefix, module in [*self.parts.items(), ("head", self.head)]:
                own = {k[len(prefix) + 1:]: t for k, t in state.items() if k.startswith(prefix + ".")}
                module.load_state_dict(own)
        for site in self.sites.values():  # its rows in the sites' banks hold the old tensors
            site.forget(self.slot)

    def _assign(self, state: dict[str, torch.Tensor]) -> None:
        """``load_state_dict(assign=True)`` for names already checked against :meth:`state`: each tensor set on the
        module that holds it, as a parameter where it replaces one (keeping its ``requires_grad``), else a buffer.
        One walk instead of one ``load_state_dict`` per part (its hooks and checks per submodule were a tenth of
        loading a ViT-B adapter file)."""
        owners = {f"{prefix}.{path}" if path else prefix: m
                  for prefix, module in [*self.parts.items(), ("head", self.head)]
                  for path, m in module.named_modules()}
        for key, tensor in state.items():
            owner_name, _, leaf = key.rpartition(".")
            owner = owners[owner_name]
            old = owner._parameters.get(leaf)
            if old is not None:
                owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
            else:
                owner._buffers[leaf] = tensor

    def detach_from_trunk(self) -> None:
        """Take this task's modules out of the shared trunk's sites; sites left empty are removed."""
        for site in self.sites.values():
            site.remove(self.slot)
        unwrap(self.trunk, only_empty=True)


KINDS: dict[str, type[Method]] = {}  # every method class by name, in the order they were defined


class Method(ABC):
    """A way to adapt a frozen backbone to a task. Subclasses set ``name`` and ``config_class``."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    takes_blocks: ClassVar[bool] = True  # False where the method puts nothing in the blocks (the linear probe)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            KINDS[cls.name] = cls

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
        self.check_applies(trunk)
        had_context = "_adaptkit_ctx" in trunk.__dict__
        ctx = task_context(trunk)
        slot = slot or ctx.new_slot()
        try:
            with skeleton() if state is not None else contextlib.nullcontext():
                run, parts, sites = self.inject(trunk, ctx, slot)
                head = nn.Linear(int(run.num_features), num_classes)
                if state is None:
                    nn.init.trunc_normal_(head.weight, std=0.02)
                    nn.init.zeros_(head.bias)
            task = TaskModel(run, ctx, slot, self, head, parts, sites)
            if state is not None:
                task.load_state(state, assign=True)
                return task
            device = next(run.parameters()).device
            for module in [*parts.values(), head]:
                module.to(device)
            return task
        except BaseException:
            _take_back(trunk, slot, had_context)
            raise

    def refusal(self, trunk: nn.Module) -> str | None:
        """Why this method cannot apply to ``trunk``'s family (one clause), or None when it can."""
        return None

    def check_applies(self, trunk: nn.Module) -> None:
        """Raise a :class:`ConfigError` saying why and which methods do apply when this one cannot apply to
        ``trunk``; called before anything is built."""
        why = self.refusal(trunk)
        if why is None:
            return
        fits = [name for name, kind in KINDS.items() if kind().refusal(trunk) is None]
        raise ConfigError(f"{self.name} cannot adapt a {family_of(trunk).name} backbone ({type(trunk).__name__}): "
                          f"{why}; pick one of {', '.join(fits)}")

    @abstractmethod
    def inject(self, trunk: nn.Module, ctx: TaskContext,
               slot: str) -> tuple[nn.Module, dict[str, nn.Module], dict[str, TaskSite]]:
        """Add modules for ``slot``; return the trunk to run, the parts by stable name, and the sites used."""


def _take_back(trunk: nn.Module, slot: str, had_context: bool) -> None:
    """Undo a failed attach: every module of ``slot`` out of every site, the sites it made unwrapped (their
    attention's flags put back), and the task context gone again if the attach brought it."""
    for module in list(trunk.modules()):
        if isinstance(module, TaskSite) and slot in module.tasks:
            module.remove(slot)
    unwrap(trunk, only_empty=True)
    if not had_context:
        trunk.__dict__.pop("_adaptkit_ctx", None)


def plain_copy(trunk: nn.Module) -> nn.Module:
    """A copy of ``trunk`` with every site and the task context removed: the backbone alone."""
    own = unwrap(copy.deepcopy(trunk))
    own.__dict__.pop("_adaptkit_ctx", None)
    return own


def private_trunk(trunk: nn.Module) -> nn.Module:
    """A trainable plain copy of ``trunk`` (for methods that train the backbone itself)."""
    return plain_copy(trunk).requires_grad_(True)

"""Adaptation methods, one file each (adapter, lora, ssf, bitfit, vpt, linear; ``METHODS`` maps a name to its class),
on the shared machinery: the per-call task context (``context``), the wrapped layers (``sites``), the scale-and-shift
site of SSF and BitFit (``affine``), ``Method`` and ``TaskModel`` (``base``)."""

from __future__ import annotations

from typing import Any

from adaptkit.errors import ConfigError
from adaptkit.methods.adapter import AdapterConfig, AdapterMethod
from adaptkit.methods.base import Method, TaskModel
from adaptkit.methods.bitfit import BitFitConfig, BitFitMethod
from adaptkit.methods.linear import FullConfig, FullMethod, LinearConfig, LinearMethod
from adaptkit.methods.lora import LoraConfig, LoraMethod, merge_lora
from adaptkit.methods.sites import TaskContext, task_context, unwrap
from adaptkit.methods.ssf import SsfConfig, SsfMethod, merge_ssf
from adaptkit.methods.vpt import VptConfig, VptMethod
from adaptkit.suggest import did_you_mean

__all__ = [
    "METHODS", "get_method", "Method", "TaskContext", "TaskModel", "task_context", "unwrap", "merge_lora",
    "AdapterConfig", "AdapterMethod", "LoraConfig", "LoraMethod", "LinearConfig", "LinearMethod",
    "FullConfig", "FullMethod", "SsfConfig", "SsfMethod", "merge_ssf", "BitFitConfig", "BitFitMethod",
    "VptConfig", "VptMethod",
]

METHODS: dict[str, type[Method]] = {m.name: m for m in (AdapterMethod, LoraMethod, SsfMethod, BitFitMethod, VptMethod,
                                                        LinearMethod, FullMethod)}


def get_method(name: str, config: dict[str, Any] | None = None) -> Method:
    """The method called ``name`` with settings from ``config`` (missing settings take their defaults)."""
    if config is not None and not isinstance(config, dict):
        raise ConfigError(f"method settings must be a dict such as {{'rank': 8}}, got {config!r}")
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in METHODS:
        hint = did_you_mean(str(name), METHODS)
        raise ConfigError(f"unknown method {name!r}: {hint + ' ' if hint else ''}choose one of {', '.join(METHODS)}")
    return METHODS[key].from_dict({k: v for k, v in (config or {}).items() if v is not None})

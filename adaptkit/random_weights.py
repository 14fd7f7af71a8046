"""Random backbone weights that are the same bits on every machine, and recovery of the ones that were not.

A ``--no-pretrained`` backbone is named by its architecture and a seed, so a registry trained on one must find the
same weights wherever it is opened. torch's own initialisers cannot promise that: ``uniform_`` and ``normal_`` have
vectorised CPU kernels (default, AVX2, AVX512 builds of the same operator, picked at start-up from the CPU) whose
results differ in the last bits; ``normal_`` draws tensors of 16 or more values by a vectorised Box-Muller whose
``log``/``cos`` differ between paths, and ``uniform_(a, b)`` rounds ``a + (b - a) * u`` with or without a fused
multiply-add. adaptkit up to 0.1 hashed timm's initialisation, so the same registry had three fingerprints on three
kinds of CPU.

:func:`seeded_init` replaces every random parameter with values derived only by exact operations: a counter-based
splitmix64 hash in unsigned 64-bit integers (wrapping arithmetic, the same everywhere), a sum of twelve 16-bit draws
(Irwin-Hall: mean 0, variance 1, bounded at +-6, exact in int64), exact conversions to float64, one correctly rounded
multiply by the scale and one correctly rounded cast to float32. IEEE 754 fixes each of those bit for bit, so the
result depends on the seed, each parameter's name and its shape, and nothing else: not the CPU, the thread count,
the torch version or timm's initialiser. Constant parameters (LayerNorm ones and zeros, zero biases, layer-scale
values) keep timm's constant, which ``fill_`` writes exactly. The scales follow timm's own initialisation of a ViT:
0.02 for linear weights and the position embedding, 1e-6 for class and register tokens, ``1/sqrt(3 * fan_in)`` for
convolutions (PyTorch's default).

:func:`recover_legacy` finds the weights of a registry trained before this: timm's initialisation under seed 0,
rebuilt in this process and, failing that, under each other CPU path in a child process
(``ATEN_CPU_CAPABILITY``), kept in adaptkit's cache once found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adaptkit.errors import BackboneError
from adaptkit.hashing import tensors_sha256
from adaptkit.metadata import FINGERPRINT

__all__ = ["cache_dir", "legacy_cache_file", "recover_legacy", "seeded_init", "seeded_values"]

_log = logging.getLogger(__name__)

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_DRAWS = 3  # three 64-bit words per value: twelve 16-bit uniforms
_CHUNK = 1 << 20  # values per block, to bound memory on large tensors


def _key(seed: int, name: str) -> np.uint64:
    digest = hashlib.sha256(f"adaptkit-random-v1:{seed}:{name}".encode()).digest()
    return np.uint64(int.from_bytes(digest[:8], "little"))


def _splitmix64(counter: np.ndarray, key: np.uint64) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = key + (counter + np.uint64(1)) * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def seeded_values(seed: int, name: str, count: int, std: float) -> np.ndarray:
    """``count`` float32 values, about N(0, std) and bounded at 6 std, that depend only on the arguments."""
    key, out = _key(seed, name), np.empty(count, dtype=np.float32)
    mask = np.uint64(0xFFFF)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        words = _splitmix64(np.arange(start * _DRAWS, (start + n) * _DRAWS, dtype=np.uint64), key).reshape(n, _DRAWS)
        total = np.zeros(n, dtype=np.int64)
        for shift in (0, 16, 32, 48):
            total += ((words >> np.uint64(shift)) & mask).astype(np.int64).sum(axis=1)
        centred = (total - 393210).astype(np.float64) / 65536.0  # 393210 = 12 * 32767.5, the mean: all exact
        out[start:start + n] = (centred * std).astype(np.float32)
    return out


def _std(name: str, param: torch.Tensor, params: dict[str, torch.Tensor]) -> float:
    """The scale timm's ViT initialisation gives a parameter of this kind."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf.endswith("_token"):
        return 1e-6
    weight = params.get(name[: -len("bias")] + "weight") if leaf == "bias" else param
    if weight is not None and weight.ndim == 4:  # a convolution: PyTorch's default kaiming_uniform_(a=sqrt(5))
        return 1.0 / (3.0 * weight[0].numel()) ** 0.5
    return 0.02


def _is_constant(param: torch.Tensor) -> bool:
    flat = param.detach().reshape(-1)
    if flat.numel() == 1:
        return float(flat[0]) in (0.0, 1.0)
    return bool((flat == flat[0]).all())


@torch.no_grad()
def seeded_init(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every non-constant floating parameter of ``model`` with :func:`seeded_values` for its name."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        if not param.is_floating_point() or _is_constant(param):
            continue
        values = seeded_values(seed, name, param.numel(), _std(name, param, params))
        param.copy_(torch.from_numpy(values).reshape(param.shape).to(param.dtype))
    return model


# -- registries trained before seeded_init --------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where adaptkit keeps what it can rebuild: ``$ADAPTKIT_CACHE``, else ``$XDG_CACHE_HOME/adaptkit``."""
    root = os.environ.get("ADAPTKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "adaptkit"
    return Path(root).expanduser()


def legacy_cache_file(fingerprint: str) -> Path:
    """Where the rebuilt legacy weights with this fingerprint are kept (a fingerprint is 64 hex digits: any other
    text, such as ``../x``, names no file here)."""
    if not isinstance(fingerprint, str) or FINGERPRINT.fullmatch(fingerprint) is None:
        raise BackboneError(f"backbone fingerprint {str(fingerprint)[:80]!r} is not 64 hex digits")
    return cache_dir() / "random-backbones" / f"{fingerprint}.safetensors"


def legacy_model(name: str, seed: int) -> nn.Module:
    """timm's initialisation of ``name`` under ``seed``: what "random" meant up to adaptkit 0.1."""
    import timm

    import adaptkit.models  # noqa: F401  (registers adaptkit's own architectures)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, num_classes=0)


def _capabilities() -> list[str]:
    """The CPU paths worth trying besides this process's own."""
    here = torch.backends.cpu.get_cpu_capability().lower()
    known = ["default", "avx2", "avx512"] if platform.machine().lower() in ("x86_64", "amd64") else ["default"]
    return [c for c in known if c != here]


def recover_legacy(name: str, seed: int, fingerprint: str, *, in_process: bool = True,
                   capabilities: list[str] | None = None) -> dict[str, torch.Tensor] | None:
    """The state dict of a legacy random backbone whose hash is ``fingerprint``, or None if no CPU path here gives it.

    Looks in the cache, then rebuilds timm's initialisation here (``in_process``), then in a child process per CPU
    path in ``capabilities`` (default: every x86 path but this one). A found state dict is cached.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cached = legacy_cache_file(fingerprint)
    if cached.is_file():
        try:
            state = load_file(str(cached))
            if tensors_sha256(state) == fingerprint:
                return state
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # a damaged copy: rebuilt below
            _log.warning("the cached weights %s are unreadable (%s): rebuilding them", cached, exc)
            cached.unlink(missing_ok=True)
    if in_process:
        state = legacy_model(name, seed).state_dict()
        if tensors_sha256(state) == fingerprint:
            return state
    cached.parent.mkdir(parents=True, exist_ok=True)
    for cap in _capabilities() if capabilities is None else capabilities:
        part = cached.with_name(f".{cached.stem}.{cap}.{os.getpid()}.part")
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
        code = "import sys; from adaptkit.random_weights import _child; _child(*sys.argv[1:])"
        try:
            out = subprocess.run([sys.executable, "-c", code, name, str(seed), str(part)], env=env, timeout=600,
                                 capture_output=True, text=True, check=True).stdout
            if json.loads(out.strip().splitlines()[-1])["fingerprint"] == fingerprint:
                os.replace(part, cached)
                _log.info("rebuilt %s's legacy random weights on the %s CPU path; cached in %s", name, cap, cached)
                return load_file(str(cached))
        except (subprocess.SubprocessError, OSError, ValueError, KeyError, IndexError) as exc:
            _log.debug("CPU path %s could not rebuild %s: %s", cap, name, exc)
        finally:
            part.unlink(missing_ok=True)
    return None


def _child(name: str, seed: str, out: str) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in legacy_model(name, int(seed)).state_dict().items()}
    save_file(state, out)
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "fingerprint": tensors_sha256(state)}))

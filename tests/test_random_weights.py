"""A random backbone is the same bits on every CPU path and thread count; a 0.1 registry's are rebuilt; a real
mismatch is one line."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import PICO

from adaptkit.backbone import create_backbone
from adaptkit.errors import BackboneError
from adaptkit.random_weights import recover_legacy, seeded_values

# what `--no-pretrained` vit_pico_patch4_32 means, on every machine: pinned so that a change shows here first
PICO_RANDOM = "e5f8c2052795f2977912bfdd417a6e63a2138964aab8817de291b03d587acbb1"
# the fingerprint adaptkit 0.1 recorded for it (tests/fixtures/registry-v0.1.db, made on an AVX2 CPU)
PICO_V01 = "554bf2c52ac782dd289e05fa6784fa2be59e2326f7ba08c12f9e5aab684c68cd"
X86 = platform.machine().lower() in ("x86_64", "amd64")

_BUILD = textwrap.dedent("""
    import json, torch
    from adaptkit.backbone import create_backbone
    b = create_backbone("vit_pico_patch4_32", pretrained=False)
    print(json.dumps({"cap": torch.backends.cpu.get_cpu_capability(), "fp": b.fingerprint}))
""")


def _built_under(capability: str, threads: int) -> dict:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", _BUILD], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_random_backbone_is_the_same_bits_here():
    assert create_backbone(PICO, pretrained=False).fingerprint == PICO_RANDOM


@pytest.mark.skipif(not X86, reason="the default/AVX2/AVX512 CPU paths are x86's")
def test_the_same_random_backbone_on_every_cpu_path_and_thread_count():
    """The bug of 0.1: torch's uniform_/normal_ kernels differ in the last bits between CPU paths."""
    runs = [_built_under(cap, threads) for cap, threads in [("default", 1), ("default", 2), ("avx2", 1),
                                                             ("avx512", 2)]]
    assert {r["fp"] for r in runs} == {PICO_RANDOM}
    assert "DEFAULT" in {r["cap"] for r in runs}  # the scalar path really ran beside a vector one
    assert len({r["cap"] for r in runs}) >= 2 or pytest.skip("this CPU has only the default path")


def test_seeded_values_are_a_scaled_bounded_normal_that_depends_only_on_the_arguments():
    a = seeded_values(0, "blocks.0.mlp.fc1.weight", 200_000, 0.02)
    assert a.dtype == np.float32 and np.array_equal(a, seeded_values(0, "blocks.0.mlp.fc1.weight", 200_000, 0.02))
    assert abs(a.mean()) < 2e-4 and abs(a.std() - 0.02) < 2e-4 and np.abs(a).max() <= 6 * 0.02
    kurtosis = ((a / a.std()) ** 4).mean()
    assert 2.8 < kurtosis < 3.0  # Irwin-Hall of 12: 2.9, close to a normal's 3
    assert not np.array_equal(a[:1000], seeded_values(0, "blocks.0.mlp.fc2.weight", 1000, 0.02))
    assert not np.array_equal(a[:1000], seeded_values(1, "blocks.0.mlp.fc1.weight", 1000, 0.02))
    assert np.array_equal(a[:1000], seeded_values(0, "blocks.0.mlp.fc1.weight", 1000, 0.02))  # a prefix: by counter


def test_random_weights_keep_timms_constants_and_scales(pico):
    state = pico.model.state_dict()
    assert torch.equal(state["blocks.0.norm1.weight"], torch.ones_like(state["blocks.0.norm1.weight"]))
    assert not state["blocks.0.attn.qkv.bias"].any()
    assert abs(state["blocks.0.attn.qkv.weight"].std().item() - 0.02) < 2e-3
    assert state["cls_token"].abs().max().item() < 1e-5
    conv = state["patch_embed.proj.weight"]
    assert abs(conv.std().item() - (3 * conv[0].numel()) ** -0.5) < 0.1 * (3 * conv[0].numel()) ** -0.5


@pytest.mark.skipif(not X86, reason="adaptkit 0.1's fixture was made on an x86 AVX2 CPU")
def test_legacy_random_weights_are_rebuilt_on_another_cpu_path_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path))
    here = torch.backends.cpu.get_cpu_capability().lower()
    state = recover_legacy(PICO, 0, PICO_V01, in_process=False, capabilities=[c for c in ("avx2",) if c != here]
                           or ["avx2"])
    if state is None:
        pytest.skip("this CPU has no AVX2 path to rebuild the fixture's weights on")
    cached = tmp_path / "random-backbones" / f"{PICO_V01}.safetensors"
    assert cached.is_file()
    assert recover_legacy(PICO, 0, PICO_V01, in_process=False, capabilities=[]) is not None  # from the cache
    backbone = create_backbone(PICO, pretrained=False, expect=PICO_V01)
    assert backbone.fingerprint == PICO_V01
    assert torch.equal(backbone.model.state_dict()["cls_token"], state["cls_token"])


def test_a_tampered_cache_file_is_not_trusted(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path))
    (tmp_path / "random-backbones").mkdir()
    save_file({"x": torch.zeros(2)}, str(tmp_path / "random-backbones" / f"{PICO_V01}.safetensors"))
    assert recover_legacy(PICO, 0, PICO_V01, in_process=False, capabilities=[]) is None


def test_random_weights_that_no_cpu_path_gives_are_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path))
    with pytest.raises(BackboneError, match=r"^backbone vit_pico_patch4_32 \(random weights\) rebuilds here as "
                                            r"e5f8c2052795, not the 0123456789ab its tasks were trained on, .*"
                                            r"export the tasks again from the registry that trained them, or "
                                            r"retrain them .* copy .*random-backbones.*0123\.safetensors here") as e:
        create_backbone(PICO, pretrained=False, expect="0123456789ab" * 5 + "0123")
    assert "\n" not in str(e.value)


def test_a_changed_weights_file_is_a_one_line_error(tmp_path, pico):
    from safetensors.torch import save_file

    path = tmp_path / "pico.safetensors"
    save_file({k: v.contiguous() for k, v in pico.model.state_dict().items()}, str(path))
    assert create_backbone(PICO, weights=path, expect=pico.fingerprint).fingerprint == pico.fingerprint
    state = pico.model.state_dict()
    state["cls_token"] = state["cls_token"] + 1
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(BackboneError, match=r"^backbone vit_pico_patch4_32 \(weights from .*pico.safetensors\) has "
                                            r"fingerprint \w{12}, but its tasks were trained on \w{12}: restore"):
        create_backbone(PICO, weights=path, expect=pico.fingerprint)


@pytest.mark.parametrize("garbage", [b"", b"not a safetensors file at all", b"\xff" * 8 + b"{}"])
def test_a_garbage_cache_file_is_rebuilt_not_an_error(tmp_path, monkeypatch, garbage):
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path))
    cached = tmp_path / "random-backbones" / f"{PICO_V01}.safetensors"
    cached.parent.mkdir()
    cached.write_bytes(garbage)
    assert recover_legacy(PICO, 0, PICO_V01, in_process=False, capabilities=[]) is None  # no CPU path asked for
    assert not cached.exists()  # the damaged copy is gone, so a rebuild can take its place

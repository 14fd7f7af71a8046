"""Backbones: frozen, fingerprinted, loadable from local files, and clear when offline."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import PICO
from safetensors.torch import save_file

from adaptkit.backbone import create_backbone, fingerprint
from adaptkit.errors import BackboneError, OfflineError


def test_frozen_eval_and_data_config(pico):
    assert not any(p.requires_grad for p in pico.model.parameters())
    assert not pico.model.training
    assert pico.weights == "random"
    assert "random weights" in pico.label
    assert pico.data_config["input_size"] == (3, 32, 32)
    assert pico.model(torch.zeros(1, 3, 32, 32)).shape == (1, pico.embed_dim)


def test_fingerprint_is_stable_and_sensitive(pico):
    again = create_backbone(PICO, pretrained=False)
    assert again.fingerprint == pico.fingerprint == fingerprint(pico.model)
    with torch.no_grad():
        again.model.blocks[2].mlp.fc1.weight[0, 0] += 1e-6
    assert fingerprint(again.model) != pico.fingerprint


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_round_trip(pico, tmp_path, suffix):
    with torch.no_grad():
        for p in pico.model.parameters():
            p.add_(0.01)
    state = {k: v.contiguous() for k, v in pico.model.state_dict().items()}
    state["head.weight"] = torch.zeros(10, pico.embed_dim)  # a classifier in the checkpoint is dropped
    path = tmp_path / f"w{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    loaded = create_backbone(PICO, weights=path)
    assert loaded.weights == f"file:{path.resolve()}"
    assert loaded.fingerprint == fingerprint(pico.model)


def test_weights_file_errors(tmp_path, pico):
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone(PICO, weights=tmp_path / "missing.safetensors")
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="could not read weights file"):
        create_backbone(PICO, weights=bad)
    other = tmp_path / "other.safetensors"
    save_file({"blocks.0.norm1.weight": torch.ones(3)}, other)
    with pytest.raises(BackboneError, match="does not fit this backbone"):
        create_backbone(PICO, weights=other)


def test_offline_hub_error_is_fast_and_names_alternatives():
    started = time.perf_counter()
    with pytest.raises(OfflineError) as info:
        create_backbone("vit_base_patch16_224.augreg_in21k")
    assert time.perf_counter() - started < 10
    # the Python API names its parameters; the command line and the page word them for their users
    assert "use weights (a .safetensors" in str(info.value) and "or pretrained=False for random" in str(info.value)
    from adaptkit.cli.common import cli_words
    from adaptkit_app.wording import page_terms

    assert "use --weights FILE (a" in info.value.worded(cli_words) and "--no-pretrained" in info.value.worded(cli_words)
    assert 'untick "Pretrained weights"' in page_terms(info.value) and "--no-pretrained" not in page_terms(info.value)


def test_model_without_pretrained_weights_says_so():
    with pytest.raises(BackboneError, match="has no pretrained weights.*give weights or pretrained=False"):
        create_backbone(PICO)


def test_unknown_and_non_vit_names():
    with pytest.raises(BackboneError, match="did you mean vit_base_patch16_224"):
        create_backbone("vit_bse_patch16_224", pretrained=False)
    with pytest.raises(BackboneError, match="not a Vision Transformer"):
        create_backbone("resnet18", pretrained=False)

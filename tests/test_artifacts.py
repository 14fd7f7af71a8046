"""Adapter files: only the task's tensors, self-describing, checked on load."""

from __future__ import annotations

import pytest
import torch
from conftest import PICO
from safetensors import safe_open

from adaptkit.artifacts import AdapterMeta, load_adapter, read_meta, save_adapter
from adaptkit.backbone import create_backbone
from adaptkit.errors import ArtifactError
from adaptkit.methods import get_method


def _trained(backbone, method="adapter", config=None, classes=5):
    task = get_method(method, {"rank": 8} if config is None else config).attach(backbone.model, classes)
    torch.manual_seed(1)
    for p in task.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    task.eval()
    meta = AdapterMeta(task="demo", classes=[f"c{i}" for i in range(classes)], method=method,
                       method_config=task.method.config_dict(), backbone=backbone.name,
                       backbone_weights=backbone.weights, backbone_fingerprint=backbone.fingerprint,
                       backbone_params=backbone.num_params, backbone_dim=backbone.embed_dim,
                       data_config=backbone.data_config, dataset="folder:x", metrics={"test_top1": 0.5})
    return task, meta


@pytest.mark.parametrize(("method", "config"), [("adapter", {"rank": 8}), ("lora", {"rank": 4}), ("linear", {}),
                                                ("full", {}), ("ssf", {}), ("bitfit", {}),
                                                ("vpt", {"tokens": 3, "mode": "shallow"}), ("vpt", {"tokens": 2}),
                                                ("adapter", {"placement": "adapterplus"})])
def test_save_load_into_fresh_backbone_gives_identical_logits(pico, images, tmp_path, method, config):
    task, meta = _trained(pico, method, config)
    with torch.no_grad():
        expected = task(images)
    path = tmp_path / "a.safetensors"
    sha, size = save_adapter(path, task.state(), meta)
    assert size == path.stat().st_size and len(sha) == 64
    with safe_open(str(path), framework="pt") as fh:
        assert set(fh.keys()) == set(task.state())  # only the task's own tensors
    fresh = create_backbone(PICO, pretrained=False)
    state, loaded_meta = load_adapter(path, sha256=sha, fingerprint=fresh.fingerprint)
    assert loaded_meta == meta
    again = get_method(loaded_meta.method, loaded_meta.method_config).attach(fresh.model, len(loaded_meta.classes))
    again.load_state(state)
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(images), expected)


def test_adapter_file_is_small_and_self_describing(pico, tmp_path):
    task, meta = _trained(pico)
    path = tmp_path / "a.safetensors"
    save_adapter(path, task.state(), meta)
    assert read_meta(path).classes == meta.classes
    assert read_meta(path).backbone_fingerprint == pico.fingerprint
    assert path.stat().st_size < 4 * pico.num_params  # smaller than the backbone itself
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed away


def test_flipped_byte_is_refused(pico, tmp_path):
    task, meta = _trained(pico)
    path = tmp_path / "a.safetensors"
    sha, _ = save_adapter(path, task.state(), meta)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_adapter(path, sha256=sha)
    with pytest.raises(ArtifactError, match="corrupt"):
        load_adapter(path)  # no registry hash: the file's own tensor hash still catches it


def test_damaged_header_and_foreign_file(pico, tmp_path):
    task, meta = _trained(pico)
    path = tmp_path / "a.safetensors"
    save_adapter(path, task.state(), meta)
    path.write_bytes(b"\x00" * 4 + path.read_bytes()[4:])
    with pytest.raises(ArtifactError, match="not a readable adapter file"):
        load_adapter(path)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(ArtifactError, match="not an adaptkit adapter file"):
        load_adapter(foreign)


def test_other_backbone_and_missing_file_are_refused(pico, tmp_path):
    task, meta = _trained(pico)
    path = tmp_path / "a.safetensors"
    save_adapter(path, task.state(), meta)
    with pytest.raises(ArtifactError, match="load it with the backbone it was trained on"):
        load_adapter(path, fingerprint="0" * 64)
    with pytest.raises(ArtifactError, match="is missing"):
        load_adapter(tmp_path / "gone.safetensors")

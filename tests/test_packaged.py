"""The backbone that ships with adaptkit: pretrained offline, stable fingerprint, and features worth adapting."""

from __future__ import annotations

import pytest

from adaptkit.backbone import create_backbone
from adaptkit.models import PACKAGED_BACKBONE, PACKAGED_FINGERPRINT
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, train

BUDGET = TrainConfig(epochs=4, batch_size=64, lr=3e-3, augment=False, limit_train=640, seed=0)


def test_loads_offline_with_its_shipped_weights():
    backbone = create_backbone(PACKAGED_BACKBONE)  # HF_HUB_OFFLINE=1: nothing may be fetched
    assert backbone.weights == "package"
    assert backbone.fingerprint == PACKAGED_FINGERPRINT
    assert backbone.label == PACKAGED_BACKBONE
    random = create_backbone(PACKAGED_BACKBONE.split(".")[0], pretrained=False)
    assert random.fingerprint != PACKAGED_FINGERPRINT


@pytest.fixture(scope="module")
def accuracies(tmp_path_factory):
    """Test top-1 on the digits (not seen in pretraining) for three runs with the same budget."""
    registry = Registry(tmp_path_factory.mktemp("packaged") / "r.db")
    runs = {"adapter": ("adapter", True), "linear": ("linear", True), "adapter_random": ("adapter", False)}
    out = {}
    for task, (method, pretrained) in runs.items():
        result = train("digits", task=task, backbone=PACKAGED_BACKBONE, pretrained=pretrained, method=method,
                       method_config={"rank": 32} if method == "adapter" else None, config=BUDGET,
                       registry=registry)
        out[task] = result.metrics["test_top1"]
    return out


def test_adapter_beats_linear_probe(accuracies):
    assert accuracies["adapter"] > accuracies["linear"] + 0.02, accuracies


def test_pretrained_weights_beat_random_ones(accuracies):
    assert accuracies["adapter"] > accuracies["adapter_random"] + 0.05, accuracies

"""Shared fixtures: offline, small ViTs, real images from ../shared/data/cifar10-mini, temporary registries."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a test never downloads
os.environ.pop("ADAPTKIT_REGISTRY", None)
os.environ["ADAPTKIT_CACHE"] = tempfile.mkdtemp(prefix="adaptkit-cache-")  # legacy random weights rebuilt by tests

import pytest  # noqa: E402
import torch  # noqa: E402
from pgserver import pg_server, registry_url  # noqa: E402,F401  (a real PostgreSQL server)

CIFAR_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini"
PICO = "vit_pico_patch4_32"  # adaptkit's 32x32 test ViT (random weights)


def task_meta(backbone, task: str, model, classes: list[str]):
    """The metadata of ``model``, an attached task with ``classes`` on ``backbone``, trained on no data set."""
    from adaptkit.artifacts import AdapterMeta

    return AdapterMeta(task=task, classes=classes, method=model.method.name, method_config=model.method.config_dict(),
                       backbone=backbone.name, backbone_weights=backbone.weights,
                       backbone_fingerprint=backbone.fingerprint, backbone_params=backbone.num_params,
                       backbone_dim=backbone.embed_dim, data_config=backbone.data_config, dataset="random")


@pytest.fixture(scope="session")
def cifar_mini() -> Path:
    if not CIFAR_MINI.is_dir():
        pytest.skip(f"{CIFAR_MINI} is missing: clone the repository beside shared/")
    return CIFAR_MINI


@pytest.fixture
def pico():
    """A fresh frozen pico backbone (seeded random weights)."""
    from adaptkit.backbone import create_backbone

    return create_backbone(PICO, pretrained=False)


@pytest.fixture
def registry(tmp_path):
    from adaptkit.registry import Registry

    return Registry(tmp_path / "registry.db")


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(4, 3, 32, 32)

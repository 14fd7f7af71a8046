"""`adaptkit backbones`: the recommended backbones by family with timm's own sizes, parameters and licences, whether
their weights are on this machine, within 80 columns piped or in a terminal; `--all` for every supported ViT."""

from __future__ import annotations

import io

import pytest
import timm
from typer.testing import CliRunner

from adaptkit import backbone_catalog
from adaptkit.backbone import create_backbone
from adaptkit.backbone_catalog import RECOMMENDED, catalog
from adaptkit.backbone_info import describe_arch
from adaptkit.cli import app
from adaptkit.cli import common as cli_common
from adaptkit.models import PACKAGED_BACKBONE

runner = CliRunner()
DINO = "vit_small_patch14_dinov2.lvd142m"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face cache; ``add(name)`` puts a pretrained tag's weights file in it."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def add(name: str) -> None:
        repo = tmp_path / "hub" / ("models--" + timm.models.get_pretrained_cfg(name).hf_hub_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("abc123")
        (repo / "snapshots" / "abc123").mkdir(parents=True)
        (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"weights")

    return add


def test_piped_table_fits_80_columns_and_reads_timm(hf_cache, monkeypatch):
    hf_cache(DINO)
    monkeypatch.setenv("COLUMNS", "80")
    result = runner.invoke(app, ["backbones"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80, result.output
    for family, names in RECOMMENDED.items():
        assert f"{family}:" in lines
        for name in names:
            row = next(ln for ln in lines if ln.startswith(name + " "))  # whole, on its own row
            cfg = timm.models.get_pretrained_cfg(name)
            assert f" {cfg.input_size[-1]} " in row and cfg.license in row
            assert row.endswith("yes") == (name in (DINO, PACKAGED_BACKBONE)), row
    assert "vit_base_patch16_224.augreg_in21k *" in result.output  # the default, marked


def test_terminal_table_fits_80_columns(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(cli_common.out, "_force_terminal", True)
    monkeypatch.setattr(cli_common.out, "_color_system", None)
    monkeypatch.setattr(cli_common.out, "_file", buf)
    monkeypatch.setattr(cli_common.out, "width", 80)
    assert runner.invoke(app, ["backbones"]).exit_code == 0
    text = buf.getvalue()
    assert max(len(ln) for ln in text.splitlines()) <= 80, text
    assert all(name in text for names in RECOMMENDED.values() for name in names) and "…" not in text
    assert "DINOv2:" in text


def test_parameters_and_width_are_the_built_models():
    by_name = {e.name: e for e in catalog()}
    packaged = create_backbone(PACKAGED_BACKBONE)  # ships with adaptkit: real weights, offline
    assert (by_name[PACKAGED_BACKBONE].params, by_name[PACKAGED_BACKBONE].width) == (packaged.num_params,
                                                                                     packaged.embed_dim)
    real = timm.create_model("eva02_small_patch14_224", pretrained=False, num_classes=0)
    assert by_name["eva02_small_patch14_224.mim_in22k"].params == sum(p.numel() for p in real.parameters())
    assert by_name["eva02_small_patch14_224.mim_in22k"].width == real.num_features == 384


def test_every_supported_vit_once_per_timm_version(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path))
    assert {"vision_transformer", "eva", "beit", "deit"} <= backbone_catalog._candidate_modules()
    monkeypatch.setattr(backbone_catalog, "_candidate_modules", lambda: {"beit"})
    entries = catalog(every=True)
    names = {e.name for e in entries}
    assert names == {n for n in timm.list_pretrained("beit*") if not n.startswith("beit3")}  # BEiT-3: another class
    assert {e.family for e in entries} == {"Beit"}
    assert list(tmp_path.glob("backbone-archs-timm-*.json"))  # kept for the next run

    def no_build(name):
        raise AssertionError(f"{name} described again")

    describe_arch.cache_clear()
    monkeypatch.setattr(backbone_catalog, "describe_arch", no_build)
    assert catalog(every=True) == entries


def test_cli_all_lists_other_classes_than_the_recommended(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(backbone_catalog, "_candidate_modules", lambda: {"deit"})
    result = runner.invoke(app, ["backbones", "--all"])
    assert result.exit_code == 0, result.output
    assert "VisionTransformerDistilled:" in result.output and "deit_base_distilled_patch16_224.fb_in1k" in result.output

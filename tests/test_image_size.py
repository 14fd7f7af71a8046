"""Backbones at another input size: built with timm's ``img_size``, weights resampled, fingerprinted with the size,
recorded with the version, and predicted at the size a task trained at."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import PICO
from safetensors.torch import load_file, save_file
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from adaptkit.backbone import BackboneSpec, create_backbone, fingerprint
from adaptkit.backbone_info import MAX_IMAGE_SIZE, check_image_size
from adaptkit.cli import app
from adaptkit.compare import compare
from adaptkit.errors import BackboneError
from adaptkit.inference import Predictor
from adaptkit.registry import Registry
from adaptkit.sizes import OWN_SIZE_KEY
from adaptkit.training import TrainConfig, train

runner = CliRunner()
QUICK = TrainConfig(epochs=1, batch_size=32, limit_train=48, limit_eval=24, threads=1)


@register_model
def vit_fixed_test_patch4_32(pretrained: bool = False, img_size: None = None, **kwargs) -> VisionTransformer:
    """A ViT whose builder refuses another ``img_size``, as a model with a fixed layout does."""
    if img_size is not None:
        raise ValueError("this layout is fixed at 32 px")
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)


def test_another_size_is_another_backbone():
    own = create_backbone(PICO, pretrained=False)
    big = create_backbone(PICO, pretrained=False, image_size=48)
    assert big.data_config["input_size"] == (3, 48, 48) and big.image_size == 48
    assert big.model.pos_embed.shape == (1, 1 + 12 * 12, 64)
    assert big.model(torch.zeros(2, 3, 48, 48)).shape == (2, big.embed_dim)
    assert big.fingerprint != own.fingerprint
    assert create_backbone(PICO, pretrained=False, image_size=48).fingerprint == big.fingerprint  # reproducible
    assert create_backbone(PICO, pretrained=False, image_size=32).fingerprint == own.fingerprint  # its own size


def test_fingerprint_covers_the_size_even_when_no_tensor_changes(pico):
    """RoPE models (DINOv3, PE spatial) have no tensor that depends on the size: the size itself tells them apart."""
    plain = fingerprint(pico.model)
    assert fingerprint(pico.model, 48) != plain
    assert fingerprint(pico.model, 48) != fingerprint(pico.model, 64)
    assert fingerprint(pico.model, None) == plain


def test_weights_file_is_resampled_to_the_size(pico, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in pico.model.state_dict().items()}, path)
    big = create_backbone(PICO, weights=path, image_size=48)
    src, got = load_file(path), big.model.state_dict()
    assert got["pos_embed"].shape == (1, 145, 64)
    torch.testing.assert_close(got["pos_embed"][:, 0], src["pos_embed"][:, 0])  # the class token's position stays
    assert all(torch.equal(got[k], v) for k, v in src.items() if k != "pos_embed")
    assert big.fingerprint == fingerprint(big.model, 48) != create_backbone(PICO, weights=path).fingerprint
    with pytest.raises(BackboneError, match="at another input size has fingerprint"):
        create_backbone(PICO, weights=path, image_size=48, expect=pico.fingerprint)


@pytest.mark.parametrize(("size", "message"), [
    (30, "image_size=30 is not a multiple of vit_pico_patch4_32's patch size 4: use 32"),
    (0, "image_size=0: the input size must be between 1 and 1024 px"),
    (-8, "image_size=-8: the input size must be between 1 and 1024 px"),
    (MAX_IMAGE_SIZE + 4, f"image_size={MAX_IMAGE_SIZE + 4}: the input size must be between"),
    ("48", "image_size must be a whole number of pixels, got '48'"),
    (48.0, "image_size must be a whole number of pixels, got 48.0"),
])
def test_bad_sizes_are_one_clear_line(size, message):
    with pytest.raises(BackboneError) as info:
        create_backbone(PICO, pretrained=False, image_size=size)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_backbone_that_cannot_change_size_says_so():
    with pytest.raises(BackboneError, match="vit_fixed_test_patch4_32 cannot be built at 48 px.*leave image_size out "
                                            "to use its own"):
        check_image_size("vit_fixed_test_patch4_32", 48)
    with pytest.raises(BackboneError, match="is a ResNet, not a ViT adaptkit adapts"):
        check_image_size("resnet18", 160)


def test_task_predicts_at_the_size_it_trained_at(tmp_path, cifar_mini):
    reg = Registry(tmp_path / "registry.db")
    data = f"folder:{cifar_mini}"
    big = train(data, task="big", backbone=BackboneSpec(PICO, pretrained=False, image_size=48), method="linear",
                config=QUICK, registry=reg).version
    own = train(data, task="own", backbone=PICO, pretrained=False, method="linear", config=QUICK,
                registry=reg).version
    assert big.backbone.fingerprint != own.backbone.fingerprint  # two registry rows
    assert big.device == "cpu (1 thread)"  # QUICK's threads=1, as `show` prints it
    assert list(big.backbone.data_config["input_size"]) == [3, 48, 48]
    assert big.backbone.data_config[OWN_SIZE_KEY] == 32 and OWN_SIZE_KEY not in own.backbone.data_config
    _, meta = reg.load_version(big)
    assert list(meta.data_config["input_size"]) == [3, 48, 48]  # the file says it too
    predictor = Predictor(reg, device="cpu")
    image = cifar_mini / "test" / "cat" / "0000.jpg"
    for ref, size in (("big", 48), ("own", 32)):
        task = predictor.load(ref)
        assert task.host.backbone.image_size == size
        assert predictor.preprocess([image], task).shape == (1, 3, size, size)
        assert len(predictor.predict([image], ref, topk=3)[0]) == 3
    report = compare(reg)  # the weights are stored once, whatever sizes they run at
    assert (report.backbones, report.backbone_bytes) == (1, own.backbone.num_params * 4)
    mixed = predictor.predict_mixed([image] * 3, ["big", "own", "big"], topk=3)  # two sizes in one request batch
    for got, ref in zip(mixed, ["big", "own", "big"], strict=True):
        alone = predictor.predict([image], ref, topk=3)[0]
        assert [p.label for p in got] == [p.label for p in alone]
        assert [p.prob for p in got] == pytest.approx([p.prob for p in alone], abs=1e-5)


def test_cli_image_size(tmp_path, cifar_mini):
    reg = tmp_path / "registry.db"
    quick = ["--backbone", PICO, "--no-pretrained", "--epochs", "1", "--limit-train", "48", "--limit-eval", "24",
             "--method", "linear", "--registry", reg]
    out = runner.invoke(app, ["train", "--dataset", f"folder:{cifar_mini}", "--task", "big", "--image-size", "48",
                              *map(str, quick)])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["show", "big", "--registry", str(reg)])
    assert out.exit_code == 0 and "(random) at 48 px, fingerprint" in out.output, out.output
    out = runner.invoke(app, ["show", "big", "--recipe", "--registry", str(reg)])
    assert out.exit_code == 0 and "image-size: 48" in out.output, out.output
    out = runner.invoke(app, ["train", "--dataset", f"folder:{cifar_mini}", "--task", "own", "--image-size", "32",
                              *map(str, quick)])  # the backbone's own size: the same backbone as no --image-size
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["list", "--registry", str(reg)])  # piped: plain, one task a line
    rows = {line.split()[0]: line.split() for line in out.output.splitlines()[1:]}
    assert rows["big"][4] == f"{PICO}@48px" and rows["own"][4] == PICO, out.output
    out = runner.invoke(app, ["show", "own", "--recipe", "--registry", str(reg)])
    assert out.exit_code == 0 and "image-size" not in out.output, out.output
    code = (f"from adaptkit.cli import app\ntry:\n    app(['list', '--registry', {str(reg)!r}], "
            "standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "import sys\nprint(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"{PICO}@48px" in listed and listed.splitlines()[-1] == "[]", listed  # the size is read without torch
    image = cifar_mini / "test" / "cat" / "0000.jpg"
    out = runner.invoke(app, ["predict", "big", str(image), "--json", "--registry", str(reg)])
    assert out.exit_code == 0 and '"predictions"' in out.output, out.output
    for size, message in (("30", "--image-size 30 is not a multiple of vit_pico_patch4_32's patch size 4"),
                          ("0", "--image-size 0: the input size must be between 1 and 1024 px")):
        out = runner.invoke(app, ["train", "--dataset", f"folder:{cifar_mini}", "--image-size", size,
                                  *map(str, quick)])
        assert out.exit_code == 1 and message in out.output and "Traceback" not in out.output, out.output


def test_list_in_a_terminal_never_cuts_the_size_of_a_long_backbone_name(tmp_path, cifar_mini, monkeypatch):
    import io

    from adaptkit.cli import common as cli_common
    from adaptkit.models import PACKAGED_BACKBONE

    reg = Registry(tmp_path / "registry.db")
    train(f"folder:{cifar_mini}", task="big", backbone=BackboneSpec(PACKAGED_BACKBONE, image_size=48),
          method="linear", config=QUICK, registry=reg)
    monkeypatch.setattr(cli_common.out, "_force_terminal", True)
    monkeypatch.setattr(cli_common.out, "_color_system", None)
    shown = 0
    for width in range(100, 200, 2):  # most are too narrow for the name and its size on one line
        buf = io.StringIO()
        monkeypatch.setattr(cli_common.out, "_file", buf)
        monkeypatch.setattr(cli_common.out, "_width", width)
        assert runner.invoke(app, ["list", "--registry", reg.url]).exit_code == 0
        text = buf.getvalue()
        if "hidden at" in text and "backbone" in text.split("hidden at")[1]:
            continue
        shown += 1
        assert "@48px" in text, (width, text)  # a long name folds (tables.WORD_MAX), its size stays whole
    assert shown


def test_train_takes_weights_with_a_name_only(tmp_path, cifar_mini):
    from adaptkit.errors import ConfigError

    spec = BackboneSpec(PICO, pretrained=False, image_size=48)
    with pytest.raises(ConfigError, match="weights and pretrained go with a backbone name"):
        train(f"folder:{cifar_mini}", backbone=spec, pretrained=False, config=QUICK, registry=tmp_path / "r.db")
    assert not (tmp_path / "r.db").exists()  # refused before the registry is opened

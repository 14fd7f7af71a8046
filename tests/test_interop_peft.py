"""PEFT adapter folders: LoRAs trained with real PEFT on the pico timm ViT are imported and give PEFT's logits;
adaptkit-trained LoRAs are exported, loaded by ``PeftModel.from_pretrained`` and give adaptkit's logits; every
refusal is one line."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys

import pytest

peft = pytest.importorskip("peft")
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from adaptkit.backbone import create_backbone  # noqa: E402
from adaptkit.errors import ArtifactError, ConfigError  # noqa: E402
from adaptkit.inference import Predictor  # noqa: E402
from adaptkit.interop.peft import PEFT_EXTRA, export_peft, import_peft  # noqa: E402
from adaptkit.registry import Registry  # noqa: E402

PICO = "vit_pico_patch4_32"
N = 10
CLASSES = [f"c{i}" for i in range(N)]
TOL = 1e-5  # max abs difference of logits, adaptkit against PEFT (same float32 maths in another order)
ALL = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"  # a regex: "proj" alone also hits patch_embed.proj


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(PICO, pretrained=False)


@pytest.fixture(scope="module")
def base_state():
    """The frozen pico weights, as a PEFT user loads them into the timm model."""
    return {k: v.clone() for k, v in create_backbone(PICO, pretrained=False).model.state_dict().items()}


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def base_model(state: dict, n: int = N) -> torch.nn.Module:
    model = timm.create_model(PICO, pretrained=False, num_classes=n)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
    return model.eval()


def save_peft(state: dict, dest, steps: int = 3, config=None, safe: bool = True, **lora):
    """Train a PEFT model a few AdamW steps on random tensors (so lora_B is not zero) and save_pretrained it."""
    torch.manual_seed(0)
    model = get_peft_model(base_model(state), config or LoraConfig(**{"modules_to_save": ["head"], **lora}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, N, (8,))
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        opt.step()
    model.save_pretrained(str(dest), safe_serialization=safe)
    return dest


@torch.no_grad()
def peft_logits(state: dict, folder, x: torch.Tensor) -> torch.Tensor:
    return PeftModel.from_pretrained(base_model(state), str(folder)).eval()(x)


def one_line(info) -> str:
    text = str(info.value)
    assert "\n" not in text
    return text


IMPORT_CASES = {  # PEFT LoraConfig -> the adaptkit LoRA config it must become
    "qkv_fc1": (dict(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], lora_dropout=0.1),
                dict(rank=4, alpha=8.0, targets=["qkv", "fc1"], dropout=0.1)),
    "rslora": (dict(r=4, lora_alpha=3, use_rslora=True, target_modules=ALL),
               dict(rank=4, alpha=6.0, targets=["qkv", "proj", "fc1", "fc2"], dropout=0.0)),
    "last_blocks": (dict(r=2, lora_alpha=16, target_modules=["qkv"], layers_to_transform=[2, 3],
                         layers_pattern="blocks"), dict(rank=2, alpha=16.0, targets=["qkv"], dropout=0.0, blocks=2)),
    "uniform_rank_pattern": (dict(r=8, lora_alpha=8, target_modules=["fc1", "fc2"], rank_pattern={"fc1": 3, "fc2": 3}),
                             dict(rank=3, alpha=8.0, targets=["fc1", "fc2"], dropout=0.0)),
}


@pytest.mark.parametrize("case", IMPORT_CASES)
def test_peft_trained_lora_imports_with_peft_logits(case, tmp_path, registry, backbone, base_state, x):
    lora, expected = IMPORT_CASES[case]
    folder = save_peft(base_state, tmp_path / case, **lora)
    assert any(t.abs().max() > 0 for k, t in load_file(folder / "adapter_model.safetensors").items()
               if "lora_B" in k)  # trained: the update is not zero
    row = import_peft(registry, folder, classes=",".join(CLASSES), backbone=backbone)
    assert (row.task.name, row.version, row.method, row.config) == (case, 1, "lora", expected)
    assert row.train == {"imported_from": str(folder.resolve()), "format": "peft"}
    got = Predictor(registry, device="cpu").logits(x, case)
    assert (got - peft_logits(base_state, folder, x)).abs().max() <= TOL


def test_classes_from_a_labels_file_and_a_task_name(tmp_path, registry, backbone, base_state):
    folder = save_peft(base_state, tmp_path / "p", steps=0, r=2, target_modules=["qkv"])
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(CLASSES[::-1]) + "\n\n")
    row = import_peft(registry, folder, task="mine", labels_file=labels, backbone=backbone)
    assert (row.task.name, row.task.classes) == ("mine", CLASSES[::-1])


def _edit_tensors(folder, fn) -> None:
    path = folder / "adapter_model.safetensors"
    save_file(fn(load_file(path)), path)


def _rename_block(tensors: dict, old: str, new: str) -> dict:
    return {k.replace(old, new): v for k, v in tensors.items()}


def _narrow(tensors: dict) -> dict:
    key = "base_model.model.blocks.0.attn.qkv.lora_A.weight"
    return {**tensors, key: tensors[key][:, :32].contiguous()}


REFUSALS = {  # name: (what is saved, an edit of the tensors, the import's arguments, error, message)
    "dora": (dict(use_dora=True, target_modules=["qkv"]), None, {}, ConfigError, "uses DoRA.*use_dora=False"),
    "bias": (dict(bias="all", target_modules=["qkv"]), None, {}, ConfigError, r"trains biases \(bias='all'\)"),
    "alpha_pattern": (dict(target_modules=["fc1", "fc2"], alpha_pattern={"fc1": 32}), None, {}, ConfigError,
                      "different alphas"),
    "rank_pattern": (dict(r=4, target_modules=["fc1", "fc2"], rank_pattern={"fc1": 2}), None, {}, ConfigError,
                     r"ranks \[2, 4\].*rank_pattern"),
    "patch_embed": (dict(target_modules=["qkv", "proj"]), None, {}, ConfigError,
                    "adapts patch_embed.proj, which adaptkit's LoRA cannot"),
    "block_subset": (dict(target_modules=["qkv"], layers_to_transform=[0, 2], layers_pattern="blocks"), None, {},
                     ConfigError, r"adapts blocks \[0, 2\] of 4.*last"),
    "no_head": (dict(target_modules=["qkv"], modules_to_save=None), None, {}, ConfigError,
                "^the adapter saves no head: .*modules_to_save"),
    "more_saved": (dict(target_modules=["qkv"], modules_to_save=["head", "norm"]), None, {}, ConfigError,
                   "saves norm.bias, which is neither"),
    "ia3": (IA3Config(target_modules=["qkv"], feedforward_modules=[], modules_to_save=["head"]), None, {},
            ConfigError, "is a IA3 adapter"),
    "outside": (dict(target_modules=["qkv"]), lambda t: _rename_block(t, "blocks.3.", "blocks.7."), {},
                ArtifactError, "adapts block 7, but vit_pico_patch4_32 has 4 blocks"),
    "shape": (dict(r=4, target_modules=["qkv"]), _narrow, {}, ArtifactError,
              r"blocks.0.attn.qkv.lora.lora_A has shape \(4, 32\), expected \(4, 64\)"),
    "class_count": (dict(target_modules=["qkv"]), None, dict(classes="a,b"), ArtifactError,
                    "2 class names for a head of 10 outputs"),
    "no_classes": (dict(target_modules=["qkv"]), None, dict(classes=None), ConfigError,
                   "does not name its classes: pass classes="),
    "both_names": (dict(target_modules=["qkv"]), None, dict(labels_file="x.txt"), ConfigError,
                   "classes or labels_file, not both"),
    "bad_task": (dict(target_modules=["qkv"]), None, dict(task="no good"), ConfigError, "bad task name"),
    "no_base": (dict(target_modules=["qkv"]), None, dict(backbone=None), ConfigError, "names no base model"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_import_refusals_are_one_line(case, tmp_path, registry, backbone, base_state):
    saved, edit, args, error, message = REFUSALS[case]
    config = saved if not isinstance(saved, dict) else None
    folder = save_peft(base_state, tmp_path / "p", steps=0, config=config, **(saved if config is None else {}))
    if edit is not None:
        _edit_tensors(folder, edit)
    with pytest.raises(error) as info:
        import_peft(registry, folder, **{"classes": CLASSES, "backbone": backbone, **args})
    assert re.search(message, one_line(info)), one_line(info)
    assert not registry.exists or not registry.tasks()  # nothing was registered


HEAD = "base_model.model.head.weight"
BAD_FILES = {  # name: (an edit of adapter_config.json, an edit of the tensors, error, message)
    "alpha_text": ({"lora_alpha": "16"}, None, "lora_alpha must be a finite number greater than 0, got '16'"),
    "alpha_list": ({"lora_alpha": [16]}, None, "lora_alpha must be a finite number"),
    "dropout_text": ({"lora_dropout": "0.1"}, None, "lora_dropout must be a finite number"),
    "dropout_one": ({"lora_dropout": 1.5}, None, "lora_dropout must be a finite number"),
    "alpha_pattern_list": ({"alpha_pattern": ["fc1", 32]}, None, "alpha_pattern must be a mapping"),
    "rank_pattern_list": ({"rank_pattern": [2]}, None, "rank_pattern must be a mapping"),
    "r_text": ({"r": "8"}, None, "r must be a whole number"),
    "r_disagrees": ({"r": 4}, None, "the LoRA tensors have rank 8, but adapter_config.json says r=4"),
    "scalar_head": ({}, lambda t: {**t, HEAD: torch.tensor(1.0)}, r"the head is not a classifier \(head.weight \(\)"),
    "huge_head": ({}, lambda t: {**t, HEAD: torch.full_like(t[HEAD], 3e38)}, "values up to 3e\\+38, beyond 10000"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_folders_are_one_line_artifact_errors(case, tmp_path, registry, backbone, base_state):
    config_edit, edit, message = BAD_FILES[case]
    folder = save_peft(base_state, tmp_path / "p", steps=0, target_modules=["qkv"])
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_edit}))
    if edit is not None:
        _edit_tensors(folder, edit)
    with pytest.raises(ArtifactError) as info:
        import_peft(registry, folder, classes=CLASSES, backbone=backbone)
    assert re.search(message, one_line(info)), one_line(info)
    assert not registry.exists or not registry.tasks()


def _deep(path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


def _huge(path) -> None:
    with open(path, "wb") as f:
        f.truncate(17 << 20)  # sparse: over the cap, on no disk


@pytest.mark.parametrize("name", ["adaptkit.json", "adapter_config.json"])
@pytest.mark.parametrize("spoil, message", [(_deep, "not (readable JSON|a PEFT config PEFT can read)"),
                                            (_huge, "is 17,825,792 bytes, over the 16 MiB")])
def test_deep_or_huge_json_in_a_folder_is_one_line(name, spoil, message, tmp_path, registry, backbone, base_state):
    folder = save_peft(base_state, tmp_path / "p", steps=0, target_modules=["qkv"])
    spoil(folder / name)
    with pytest.raises(ArtifactError) as info:
        import_peft(registry, folder, classes=CLASSES, backbone=backbone)
    assert re.search(message, one_line(info)), one_line(info)


def test_the_wrong_backbone_is_named_so(tmp_path, registry, backbone, base_state):
    folder = save_peft(base_state, tmp_path / "p", steps=0, target_modules=["qkv"])
    other = create_backbone("vit_cifar_tiny_patch4_32", pretrained=False)  # 6 blocks of 192, pico: 4 of 64
    with pytest.raises(ArtifactError) as info:
        import_peft(registry, folder, classes=CLASSES, backbone=other)
    assert one_line(info).startswith("wrong backbone: ") and "reads 64 features, but vit_cifar_tiny_patch4_32 gives " \
        "192" in one_line(info)
    path = folder / "adapter_config.json"
    named = {**json.loads(path.read_text()), "base_model_name_or_path": "timm/vit_small_patch16_224"}
    path.write_text(json.dumps(named))
    with pytest.raises(ArtifactError) as info:
        import_peft(registry, folder, classes=CLASSES, backbone=backbone)
    assert re.search(r"^wrong backbone: .* was trained on timm/vit_small_patch16_224, not vit_pico_patch4_32",
                     one_line(info)), one_line(info)
    assert not registry.exists or not registry.tasks()


def test_folder_refusals(tmp_path, registry, backbone, base_state):
    folder = save_peft(base_state, tmp_path / "bin", steps=0, safe=False, target_modules=["qkv"])
    cases = [(folder, "holds adapter_model.bin, a pickle.*safe_serialization=True"),
             (tmp_path / "none", "does not exist: give the folder"),
             (tmp_path, "has no adapter_config.json")]
    for src, message in cases:
        with pytest.raises(ArtifactError) as info:
            import_peft(registry, src, classes=CLASSES, backbone=backbone)
        assert re.search(message, one_line(info)), one_line(info)


# -- export: adaptkit-trained tasks -> PEFT ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_mini):
    from adaptkit.training import TrainConfig, train

    reg = tmp_path_factory.mktemp("peft") / "r.db"
    pico = create_backbone(PICO, pretrained=False)
    config = TrainConfig(epochs=1, batch_size=16, limit_train=32, limit_eval=16, threads=1, lr=0.05)
    tasks = {"lora_all": ("lora", {"rank": 4, "alpha": 8.0, "targets": "qkv,proj,fc1,fc2"}),
             "lora_last": ("lora", {"rank": 2, "targets": "qkv", "blocks": 2}), "linear": ("linear", None)}
    for task, (method, method_config) in tasks.items():
        train(f"folder:{cifar_mini}", task=task, backbone=pico, method=method, method_config=method_config,
              config=config, registry=reg)
    return reg


@pytest.fixture(scope="module")
def images(trained, cifar_mini):
    predictor = Predictor(trained, device="cpu")
    return predictor.preprocess(sorted((cifar_mini / "test").rglob("*.jpg"))[::41][:4], predictor.load("lora_all"))


@pytest.mark.parametrize("task", ["lora_all", "lora_last"])
def test_export_loads_in_peft_with_adaptkit_logits(task, trained, images, base_state, tmp_path):
    dest = export_peft(trained, task, tmp_path / task)
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "adapter_config.json",
                                                      "adapter_model.safetensors", "adaptkit.json"]
    config = json.loads((dest / "adapter_config.json").read_text())
    assert (config["peft_type"], config["modules_to_save"], config["base_model_name_or_path"]) == ("LORA", ["head"],
                                                                                                    PICO)
    predictor = Predictor(trained, device="cpu")
    want = predictor.logits(images, task)
    model = PeftModel.from_pretrained(base_model(base_state), str(dest)).eval()
    adapted = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters()
               if ".lora_A." in n}
    expected = {"lora_all": {f"blocks.{i}.{p}" for i in range(4) for p in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                              "mlp.fc2")},
                "lora_last": {"blocks.2.attn.qkv", "blocks.3.attn.qkv"}}[task]
    assert adapted == expected  # patch_embed.proj stays plain
    with torch.no_grad():
        got = model(images)
    assert (got - want).abs().max() <= TOL
    assert (want - predictor.logits(images, "linear")).abs().max() > 1e-3  # the comparison can tell tasks apart
    side = json.loads((dest / "adaptkit.json").read_text())
    assert (side["task"], side["classes"], side["backbone"]) == (f"{task}@1", predictor.load(task).classes, PICO)
    assert side["backbone_fingerprint"] == predictor.load(task).meta.backbone_fingerprint
    assert side["data_config"]["input_size"] == [3, 32, 32] and "create_backbone" in side["base_model"]


def test_export_then_import_needs_no_arguments(trained, images, tmp_path):
    dest = export_peft(trained, "lora_last", tmp_path / "copy")
    row = import_peft(tmp_path / "other.db", dest)  # classes and backbone from adaptkit.json
    original = Predictor(trained, device="cpu")
    assert (row.task.name, row.config) == ("copy", original.registry.get_version("lora_last").config)
    again = Predictor(tmp_path / "other.db", device="cpu")
    assert torch.equal(again.logits(images, "copy"), original.logits(images, "lora_last"))
    other = dataclasses.replace(create_backbone(PICO, pretrained=False), fingerprint="0" * 64)
    with pytest.raises(ArtifactError) as info:
        import_peft(tmp_path / "other.db", dest, task="copy2", backbone=other)
    assert "exported from a backbone with fingerprint" in one_line(info)
    assert one_line(info).endswith("(backbone with weights for a weights file or pretrained=False for random ones)")


def test_export_refusals_are_one_line(trained, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("keep")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(dict(ref="linear", dest_dir=tmp_path / "l"), "linear task, which has no PEFT form \\(a linear probe "
              "adapts no layer.*--format adaptkit or --format onnx"),
             (dict(ref="lora_all", dest_dir=full), "exists and is not empty.*overwrite=True"),
             (dict(ref="lora_all", dest_dir=tmp_path / "no" / "such"), "folder .* does not exist: create it first"),
             (dict(ref="lora_all", dest_dir=a_file), "is not a folder")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as info:
            export_peft(trained, **kwargs)
        assert re.search(message, one_line(info)), one_line(info)
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    export_peft(trained, "lora_all", full, overwrite=True)
    assert {"keep.txt", "adapter_model.safetensors"} <= {p.name for p in full.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary folder left
    shutil.rmtree(full)


def test_a_forced_export_over_a_folder_in_a_files_place_writes_nothing(trained, tmp_path):
    dest = tmp_path / "dest"
    (dest / "adapter_model.safetensors").mkdir(parents=True)  # a folder where PEFT's weights go
    (dest / "adapter_config.json").write_text("mine")
    with pytest.raises(ConfigError) as info:
        export_peft(trained, "lora_all", dest, overwrite=True)
    assert re.search(r"holds adapter_model\.safetensors as something other than a file.*move that away",
                     one_line(info)), one_line(info)
    assert (dest / "adapter_config.json").read_text() == "mine" and sorted(p.name for p in dest.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]  # not half an export
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]  # no temporary folder left


def test_missing_extra(monkeypatch, tmp_path, registry):
    monkeypatch.setitem(sys.modules, "peft", None)
    for call in (lambda: export_peft(registry, "t", tmp_path / "x"), lambda: import_peft(registry, tmp_path)):
        with pytest.raises(ConfigError) as info:
            call()
        assert one_line(info).endswith("needs the peft extra: pip install 'adaptkit[peft]'")
    assert PEFT_EXTRA == "PEFT export needs the peft extra: pip install 'adaptkit[peft]'"


def test_cli_exports_and_imports_peft_folders(trained, images, tmp_path):
    from typer.testing import CliRunner

    from adaptkit.cli import app

    def cli(*args: object):
        result = CliRunner().invoke(app, [str(a) for a in args])
        return result.exit_code, " ".join(result.output.split())

    code, text = cli("export", "lora_all", tmp_path / "peft", "--format", "peft", "--registry", trained)
    assert code == 0 and f"exported lora_all to {tmp_path / 'peft'} (peft)" in text
    other = tmp_path / "other.db"
    code, text = cli("import", tmp_path / "peft", "--classes", "a,b", "--registry", other)
    assert code == 1 and "\n" not in text and "2 class" in text and not other.exists()
    code, text = cli("import", tmp_path / "peft", "--task", "mine", "--registry", other)
    assert code == 0 and "imported PEFT adapter" in text and "as mine@1" in text
    assert torch.equal(Predictor(other, device="cpu").logits(images, "mine"),
                       Predictor(trained, device="cpu").logits(images, "lora_all"))
    code, text = cli("import", tmp_path / "peft", "--task", "mine", "--registry", other)
    assert code == 1 and "is identical to mine@1 already in this registry" in text
    code, text = cli("export", "linear", tmp_path / "lin", "--format", "peft", "--registry", trained)
    assert code == 1 and "adapts no layer" in text and not (tmp_path / "lin").exists()
    code, text = cli("import", tmp_path / "x.safetensors", "--classes", "a,b", "--registry", other)
    assert code == 1 and "--classes apply to PEFT adapter folders" in text


def test_cli_import_of_a_folder_trained_on_random_weights_takes_no_pretrained(tmp_path, base_state):
    from typer.testing import CliRunner

    from adaptkit.cli import app

    folder = save_peft(base_state, tmp_path / "p", target_modules=["qkv"])  # on pico's seeded random weights
    reg = tmp_path / "r.db"
    base = ["import", str(folder), "--classes", ",".join(CLASSES), "--registry", str(reg)]
    result = CliRunner().invoke(app, [*base, "--no-pretrained"])
    assert result.exit_code == 1 and "--no-pretrained needs --backbone NAME" in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*base, "--backbone", PICO, "--no-pretrained"])
    assert result.exit_code == 0, result.output
    assert Registry(reg).get_version("p").backbone.weights == "random"

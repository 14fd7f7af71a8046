"""What an imported file says about itself is checked where it enters, once: an adapter file's data config, class
names and data set name; a PEFT folder's adaptkit.json (fingerprint, classes, data config); and an imported
version's data set never drives `routing fit` on trust."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest
from conftest import CIFAR_MINI, PICO
from safetensors.torch import save_file

from adaptkit.artifacts import AdapterMeta, tensors_sha256
from adaptkit.errors import ArtifactError, DatasetError
from adaptkit.methods import get_method
from adaptkit.registry import Registry


@pytest.fixture
def adapter_file(pico, tmp_path):
    """Write a linear-probe adapter file on pico with metadata ``changes`` (JSON values) laid over good ones."""
    task = get_method("linear", {}).attach(pico.model, 3)
    state = {k: v.contiguous() for k, v in task.state().items()}
    meta = AdapterMeta(task="probe", classes=["airplane", "bird", "cat"], method="linear", method_config={},
                       backbone=pico.name, backbone_weights=pico.weights, backbone_fingerprint=pico.fingerprint,
                       backbone_params=pico.num_params, backbone_dim=pico.embed_dim, data_config=pico.data_config,
                       dataset="folder:/etc")

    def write(name: str = "a", **changes: object):
        strings = meta.to_strings(tensors_sha256(state))
        strings.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in changes.items()})
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path), metadata=strings)
        return path

    return write


BAD_FILES = {  # metadata field -> value, and the refusal's words
    "huge_input": ("data_config", {"input_size": [3, 100_000, 100_000]}, "input_size must be"),
    "no_input": ("data_config", {"mean": [0.5, 0.5, 0.5]}, "input_size must be"),
    "text_mean": ("data_config", {"input_size": [3, 32, 32], "mean": ["a", "b", "c"]}, "mean must be 3 finite"),
    "zero_std": ("data_config", {"input_size": [3, 32, 32], "std": [1, 0, 1]}, "std must be 3 finite numbers above"),
    "interp": ("data_config", {"input_size": [3, 32, 32], "interpolation": "x" * 99}, "interpolation must be one"),
    "crop": ("data_config", {"input_size": [3, 32, 32], "crop_pct": 5}, r"crop_pct must be a number in \(0, 1\]"),
    "nested": ("data_config", {"input_size": [3, 32, 32], "extra": {"a": [1]}}, "must be a number, a short string"),
    "escape": ("classes", ["a", "\x1b[2J\x1b[31mb", "c"], "holds the control character '\\\\x1b'"),
    "bidi": ("classes", ["a", "b\u202ec", "c"], "holds the control character"),
    "long_class": ("classes", ["a", "b" * 1_000_000, "c"], "has 1,000,000 characters, more than 256"),
    "long_dataset": ("dataset", "folder:" + "d" * 10_000_000, "has 10,000,007 characters, more than 1,024"),
    "newline_dataset": ("dataset", "folder:/x\nimported ok", "control character"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_an_adapter_file_with_bad_metadata_is_refused_at_import(case, adapter_file, tmp_path):
    field, value, message = BAD_FILES[case]
    registry = Registry(tmp_path / "r.db")
    with pytest.raises(ArtifactError) as info:
        registry.import_file(adapter_file(**{field: value}))
    text = str(info.value)
    assert re.search(message, text), text
    assert "bad metadata" in text and "\n" not in text and len(text) < 500  # the value is cut, not echoed
    assert "\x1b" not in text and "\u202e" not in text
    assert not registry.tasks()  # nothing was registered
    assert registry.import_file(adapter_file("good")).ref == "probe@1"  # the same file, untouched, is fine


FOREIGN = "ab" * 32  # well formed, and no backbone adaptkit builds
CAT = CIFAR_MINI / "test" / "cat" / "0000.jpg"


def test_a_file_of_its_own_backbone_imports_without_a_word(adapter_file, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="adaptkit"):
        Registry(tmp_path / "r.db").import_file(adapter_file())
    assert not caplog.records


def test_random_weights_no_backbone_has_are_told_at_import_and_at_the_first_prediction(adapter_file, tmp_path, pico,
                                                                                        caplog, monkeypatch):
    import adaptkit.random_weights
    from adaptkit.errors import BackboneError
    from adaptkit.inference import Predictor

    registry = Registry(tmp_path / "r.db")
    path = adapter_file(backbone_fingerprint=FOREIGN)
    with caplog.at_level(logging.WARNING, logger="adaptkit"):
        v = registry.import_file(path)  # kept: it may be adaptkit 0.1's random weights, found at prediction
    [record] = caplog.records
    text = record.getMessage()
    assert text.startswith(f"probe@1: {path} says it was trained on {PICO} (random weights) of fingerprint "
                           f"{FOREIGN[:12]}, but adaptkit's random weights of {PICO} are {pico.fingerprint[:12]}")
    assert "export it again from the registry that trained it, or retrain it here" in text
    monkeypatch.setattr(adaptkit.random_weights, "_capabilities", lambda: [])  # no child process per CPU path
    with pytest.raises(BackboneError) as info:
        Predictor(registry).predict([CAT], v.ref)
    text = str(info.value)
    assert text.startswith(f"probe@1 was imported from {path}: backbone {PICO} (random weights) rebuilds here as "
                           f"{pico.fingerprint[:12]}, not the {FOREIGN[:12]} its tasks were trained on")
    assert "export the tasks again from the registry that trained them, or retrain them" in text and "\n" not in text


def test_random_weights_too_large_to_rebuild_at_import_get_a_warning_saying_what_comes(adapter_file, tmp_path,
                                                                                         caplog, monkeypatch):
    import adaptkit.registry.transfer

    monkeypatch.setattr(adaptkit.registry.transfer, "CHECK_PARAMS", 0)  # pico stands in for a ViT-B
    with caplog.at_level(logging.WARNING, logger="adaptkit"):
        Registry(tmp_path / "r.db").import_file(adapter_file(backbone_fingerprint=FOREIGN))
    [record] = caplog.records
    assert "too large to rebuild now: the first prediction rebuilds it and refuses the task if the weights " \
           "differ" in record.getMessage()


def test_packaged_weights_that_differ_are_refused_at_import(tmp_path):
    from adaptkit.backbone import create_backbone
    from adaptkit.models import PACKAGED_BACKBONE

    packaged = create_backbone(PACKAGED_BACKBONE)
    assert packaged.weights == "package"
    task = get_method("linear", {}).attach(packaged.model, 2)
    state = {k: v.contiguous() for k, v in task.state().items()}
    meta = AdapterMeta(task="pkg", classes=["a", "b"], method="linear", method_config={}, backbone=PACKAGED_BACKBONE,
                       backbone_weights="package", backbone_fingerprint=FOREIGN, backbone_params=packaged.num_params,
                       backbone_dim=packaged.embed_dim, data_config=packaged.data_config, dataset="digits")
    path = tmp_path / "pkg.safetensors"
    save_file(state, str(path), metadata=meta.to_strings(tensors_sha256(state)))
    registry = Registry(tmp_path / "r.db")
    with pytest.raises(ArtifactError, match=f"with packaged weights of fingerprint {FOREIGN[:12]}, but this "
                                            f"adaptkit's are {packaged.fingerprint[:12]}: export it again"):
        registry.import_file(path)
    assert not registry.tasks()
    meta.backbone_fingerprint = packaged.fingerprint  # the packaged weights' own: imported
    save_file(state, str(path), metadata=meta.to_strings(tensors_sha256(state)))
    assert registry.import_file(path).ref == "pkg@1"


def test_cli_import_of_a_bad_file_prints_one_clean_line(adapter_file, tmp_path):
    from typer.testing import CliRunner

    from adaptkit.cli import app

    path = adapter_file(classes=["a", "\x1b]0;pwned\x07", "c"])
    result = CliRunner().invoke(app, ["import", str(path), "--registry", str(tmp_path / "r.db")])
    assert result.exit_code == 1 and "control character" in result.output
    assert "\x1b" not in result.output and "\x07" not in result.output


def test_routing_fit_never_reads_an_imported_files_data_set_on_trust(adapter_file, tmp_path, cifar_mini):
    from adaptkit.inference import fit_routing

    registry = Registry(tmp_path / "r.db")
    registry.import_file(adapter_file(dataset="folder:/etc"))
    with pytest.raises(DatasetError) as info:
        fit_routing(["probe"], registry=registry, device="cpu")
    text = str(info.value).replace("\x1f", "")
    assert text.startswith("cannot compute routing statistics of probe@1: it was imported") and "as dataset" in text
    notes: list[tuple[str, str]] = []
    assert fit_routing(registry=registry, device="cpu", on_task=lambda ref, what: notes.append((ref, what))) == []
    assert notes[0][0] == "probe@1" and notes[0][1].startswith("skipped: it was imported")
    assert "passwd" not in text + notes[0][1]  # nothing under /etc was listed
    done = fit_routing(["probe"], registry=registry, device="cpu", dataset=f"folder:{cifar_mini}")
    assert done == ["probe@1"]  # the user's own data set is read


def test_cli_routing_fit_names_the_option(adapter_file, tmp_path):
    from typer.testing import CliRunner

    from adaptkit.cli import app

    registry = tmp_path / "r.db"
    Registry(registry).import_file(adapter_file(dataset="hf:someone/evil"))
    result = CliRunner().invoke(app, ["routing", "fit", "probe", "--registry", str(registry)])
    assert result.exit_code == 1
    assert "was imported" in result.output and "--dataset" in " ".join(result.output.split())


# -- PEFT folders: adaptkit.json ----------------------------------------------------------------------------------


@pytest.fixture
def peft_folder(tmp_path):
    """A real PEFT LoRA folder on pico (untrained), with an adaptkit.json of ``side`` values laid over good ones."""
    pytest.importorskip("peft")
    import timm
    from peft import LoraConfig, get_peft_model

    from adaptkit.backbone import create_backbone

    pico = create_backbone(PICO, pretrained=False)
    model = timm.create_model(PICO, pretrained=False, num_classes=3)
    model.load_state_dict(pico.model.state_dict(), strict=False)
    folder = tmp_path / "peft"
    get_peft_model(model, LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["head"])).save_pretrained(folder)

    def write(**side: object):
        good = {"backbone": PICO, "backbone_weights": "random", "backbone_fingerprint": pico.fingerprint,
                "classes": ["a", "b", "c"], "dataset": "folder:x", "data_config": pico.data_config}
        (folder / "adaptkit.json").write_text(json.dumps({**good, **side}))
        return folder

    return write


@pytest.mark.parametrize(("side", "message"), [
    ({"backbone_fingerprint": "../../../../tmp/evil"}, "backbone_fingerprint must be 64 hex digits"),
    ({"classes": ["a", "b\x1b[8m", "c"]}, "control character"),
    ({"dataset": "hf:" + "x" * 5000}, "more than 1,024"),
    ({"data_config": {"input_size": [3, 32, 32], "mean": "0.5"}}, "mean must be 3 finite numbers"),
])
def test_a_peft_side_file_with_bad_values_is_refused(side, message, peft_folder, tmp_path, monkeypatch):
    from adaptkit.interop.peft import import_peft

    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ArtifactError) as info:
        import_peft(tmp_path / "r.db", peft_folder(**side))
    assert message in str(info.value) and "adaptkit.json" in str(info.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "r.db").exists()


def test_an_unknown_fingerprint_starts_no_rebuild(peft_folder, tmp_path, monkeypatch):
    """A well-formed fingerprint this registry has never seen is compared, not rebuilt in child processes."""
    from adaptkit.interop.peft import import_peft

    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path / "cache"))
    start = time.monotonic()
    with pytest.raises(ArtifactError) as info:
        import_peft(tmp_path / "r.db", peft_folder(backbone_fingerprint="ab" * 32))
    assert "exported from a backbone with fingerprint abababababab" in str(info.value)
    assert not (tmp_path / "cache").exists()  # no legacy rebuild was tried (it caches under random-backbones/)
    assert time.monotonic() - start < 120
    assert import_peft(tmp_path / "r.db", peft_folder()).ref == "peft@1"  # the true fingerprint imports


def test_a_fingerprint_never_names_a_path():
    from adaptkit.errors import BackboneError
    from adaptkit.random_weights import legacy_cache_file

    with pytest.raises(BackboneError, match="not 64 hex digits"):
        legacy_cache_file("../../etc/passwd")
    assert legacy_cache_file("0" * 64).name == "0" * 64 + ".safetensors"

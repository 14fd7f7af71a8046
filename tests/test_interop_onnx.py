"""ONNX export: one task per graph and several tasks in one graph, run with onnxruntime on real images and compared
with adaptkit's own logits; metadata; refusals. One registry (pico backbone) is trained once for the whole file."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
import onnxruntime as ort  # noqa: E402

from adaptkit.errors import ConfigError, RegistryError  # noqa: E402
from adaptkit.inference import Predictor  # noqa: E402
from adaptkit.interop.onnx import ONNX_EXTRA, export_onnx, export_onnx_registry, read_onnx_metadata  # noqa: E402

TOL = 1e-4  # max abs difference of logits, onnxruntime (CPU) against torch; measured about 3e-7
METHODS = ["lora", "adapter", "linear", "vpt", "ssf", "bitfit"]  # merged, a site in every block, the head alone,
# extra tokens, a scale and shift per layer (merged), a shift per layer (merged)
CLASSES = {"vpt": "0-4"}  # one task with fewer classes: the registry graph pads its logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_mini):
    from adaptkit.backbone import create_backbone
    from adaptkit.training import TrainConfig, train

    reg = tmp_path_factory.mktemp("onnx") / "r.db"
    pico = create_backbone("vit_pico_patch4_32", pretrained=False)
    config = TrainConfig(epochs=1, batch_size=16, limit_train=32, limit_eval=16, threads=1)
    for method in [*METHODS, "full"]:
        train(f"folder:{cifar_mini}", task=method, backbone=pico, method=method, config=config, registry=reg,
              classes=CLASSES.get(method))
    train(f"folder:{cifar_mini}", task="broken", backbone=pico, method="linear", config=config, registry=reg)
    return reg


@pytest.fixture(scope="module")
def predictor(trained):
    return Predictor(trained, device="cpu")


@pytest.fixture(scope="module")
def batch(predictor, cifar_mini):
    images = sorted((cifar_mini / "test").rglob("*.jpg"))[::37][:5]
    assert len(images) == 5
    return predictor.preprocess(images, predictor.load("lora"))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """Each method's graph, exported once; ``linear`` into a folder over an existing file (overwrite=True)."""
    out = tmp_path_factory.mktemp("graphs")
    (out / "linear-v1.onnx").write_bytes(b"old")
    cache: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in cache:
            dest = out if method == "linear" else out / f"{method}.onnx"
            cache[method] = export_onnx(trained, method, dest, overwrite=method == "linear")
        return cache[method]

    return get


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("method", METHODS)
def test_graph_matches_predictor_at_any_batch(method, exported, predictor, batch):
    path = exported(method)
    session = _session(path)
    (image,), (logits,) = session.get_inputs(), session.get_outputs()
    assert (image.name, image.type, logits.name) == ("image", "tensor(float)", "logits")
    assert isinstance(image.shape[0], str) and image.shape[1:] == [3, 32, 32]  # a symbolic batch dimension
    want = predictor.logits(batch, method).numpy()
    for x, ref in ((batch, want), (batch[:1], want[:1])):  # batch 5 and batch 1 through the same graph
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= TOL
    if method == "linear":
        assert path.name == "linear-v1.onnx" and path.stat().st_size > 1000  # a folder names it; old file replaced


def test_metadata_round_trips(exported, predictor):
    lora, adapter = exported("lora"), exported("adapter")
    meta = read_onnx_metadata(lora)
    task = predictor.load("lora")
    assert meta["classes"] == task.classes and len(meta["classes"]) == 10
    data = task.host.backbone.data_config
    assert meta["data_config"] == json.loads(json.dumps({k: data[k] for k in meta["data_config"]}))
    assert {"input_size", "mean", "std", "interpolation", "crop_pct"} <= set(meta["data_config"])
    assert meta["data_config"]["input_size"] == [3, 32, 32]
    assert (meta["task"], meta["method"], meta["merged"]) == ("lora@1", "lora", True)
    assert meta["backbone"] == "vit_pico_patch4_32"
    assert meta["backbone_fingerprint"] == task.meta.backbone_fingerprint
    assert meta["exporter"] == "torch.export" and meta["adaptkit_version"]
    assert read_onnx_metadata(adapter)["merged"] is False
    custom = _session(lora).get_modelmeta().custom_metadata_map  # what a runtime without adaptkit sees
    assert json.loads(custom["classes"]) == task.classes


@pytest.fixture(scope="module")
def registry_graph(trained, tmp_path_factory) -> Path:
    """Every exportable method in one graph, exported once into a folder (it names the file)."""
    return export_onnx_registry(trained, tmp_path_factory.mktemp("registry-graph"), METHODS)


def test_registry_graph_runs_each_sample_through_its_own_task(registry_graph, predictor, batch):
    path = registry_graph
    assert path.name == "tasks.onnx"
    meta = read_onnx_metadata(path)
    assert meta["class_counts"] == [5 if m == "vpt" else 10 for m in METHODS]
    assert [t["ref"] for t in meta["tasks"]] == [f"{m}@1" for m in METHODS]
    vpt = METHODS.index("vpt")
    assert meta["tasks"][vpt]["classes"] == predictor.load("vpt").classes
    session = _session(path)
    for index in ([0, 1, vpt, 1, 0], [vpt] * 5, [1]):
        x = batch[: len(index)]
        got = session.run(None, {"image": x.numpy(), "task_index": np.array(index, dtype=np.int64)})[0]
        assert got.shape == (len(index), 10)
        for b, i in enumerate(index):
            want = predictor.logits(x[b: b + 1], METHODS[i]).numpy()[0]
            assert np.abs(got[b, : len(want)] - want).max() <= TOL
            assert np.all(got[b, len(want):] == -np.inf)  # padding of a task with fewer classes


def test_registry_graph_of_every_method_pair_equals_each_task_alone(registry_graph, predictor, batch):
    """Every exportable method in one graph; each pair of them in one batch, and each task in a batch of its own:
    a task with nothing at a site (LoRA at SSF's sites, SSF at an adapter's) must leave the sample unchanged there."""
    session = _session(registry_graph)
    want = {m: predictor.logits(batch[:2], m).numpy() for m in METHODS}
    pairs = [(i, j) for i in range(len(METHODS)) for j in range(len(METHODS))]
    for i, j in pairs:
        got = session.run(None, {"image": batch[:2].numpy(), "task_index": np.array([i, j], dtype=np.int64)})[0]
        for b, k in enumerate((i, j)):
            ref = want[METHODS[k]][b]
            assert np.abs(got[b, : len(ref)] - ref).max() <= TOL, (METHODS[i], METHODS[j], b)


def test_registry_graph_refuses_a_full_task(trained, tmp_path):
    with pytest.raises(ConfigError, match="full@1 fine-tune.*export it alone"):
        export_onnx_registry(trained, tmp_path / "x.onnx", ["lora", "full"])
    assert not (tmp_path / "x.onnx").exists()


def test_refusals_are_one_line(trained, tmp_path):
    existing = tmp_path / "there.onnx"
    existing.write_bytes(b"keep")
    cases = [
        (dict(ref="lora", dest=existing), ConfigError, "exists already.*overwrite=True"),
        (dict(ref="lora", dest=tmp_path / "no" / "such.onnx"), ConfigError, "does not exist"),
        (dict(ref="lora", dest=tmp_path / "a.onnx", opset=3), ConfigError, "opset must be"),
        (dict(ref="nope", dest=tmp_path / "a.onnx"), RegistryError, "no task 'nope'"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message) as info:
            export_onnx(trained, **kwargs)
        assert "\n" not in str(info.value)
    assert existing.read_bytes() == b"keep" and not (tmp_path / "a.onnx").exists()


def test_a_broken_version_is_refused(trained, tmp_path):
    with sqlite3.connect(trained) as con:  # a task of its own is tampered with: the others stay usable
        con.execute("UPDATE adapter_versions SET sha256 = 'bad' WHERE task_id = "
                    "(SELECT id FROM tasks WHERE name = 'broken')")
    with pytest.raises(RegistryError, match="broken@1 is broken.*doctor") as info:
        export_onnx(trained, "broken", tmp_path / "b.onnx")
    assert "\n" not in str(info.value) and not (tmp_path / "b.onnx").exists()


def test_missing_extra_says_what_to_install(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now fails as if not installed
    with pytest.raises(ConfigError) as info:
        export_onnx(trained, "lora", tmp_path / "a.onnx")
    assert str(info.value) == ONNX_EXTRA == "ONNX export needs the onnx extra: pip install 'adaptkit[onnx]'"


def test_cli_exports_one_task_and_several(trained, tmp_path, predictor, batch):
    from typer.testing import CliRunner

    from adaptkit.cli import app

    def cli(*args: object):
        return CliRunner().invoke(app, [str(a) for a in args])

    one = cli("export", "lora", tmp_path / "lora.onnx", "--registry", trained)  # the suffix picks the format
    assert one.exit_code == 0, one.output
    assert f"exported lora to {tmp_path / 'lora.onnx'} (onnx)" in " ".join(one.output.split())
    assert read_onnx_metadata(tmp_path / "lora.onnx")["task"] == "lora@1"
    both = cli("export", "lora,linear", tmp_path, "--format", "onnx", "--registry", trained)
    assert both.exit_code == 0, both.output
    got = _session(tmp_path / "tasks.onnx").run(None, {"image": batch[:2].numpy(),
                                                        "task_index": np.array([1, 0], dtype=np.int64)})[0]
    assert np.abs(got[0] - predictor.logits(batch[:1], "linear").numpy()[0]).max() <= TOL
    for args, message in ((["--format", "tflite"], "--format must be one of adaptkit, peft, onnx, got 'tflite'"),
                          (["--opset", "17"], "--opset is for --format onnx only"),
                          (["--format", "adaptkit", "--force"], None)):
        dest = tmp_path / "x.safetensors"
        result = cli("export", "lora,linear" if message is None else "lora", dest, *args, "--registry", trained)
        assert result.exit_code == 1
        text = " ".join(result.output.split())
        assert (message or "several tasks make one file only with --format onnx") in text
    assert not (tmp_path / "x.safetensors").exists()

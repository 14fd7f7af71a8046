"""The command line end to end on real images: train every method, inspect, predict, compare, move, remove."""

from __future__ import annotations

import json

import pytest
from conftest import PICO
from safetensors.torch import load_file
from typer.testing import CliRunner

from adaptkit.backbone import create_backbone
from adaptkit.cli import app
from adaptkit.registry import Registry

runner = CliRunner()
QUICK = ["--backbone", PICO, "--no-pretrained", "--epochs", "1", "--batch-size", "32", "--limit-train", "64",
         "--limit-eval", "40"]


def run(*args: str, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def fails(*args: str, message: str) -> None:
    result = run(*args, ok=False)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_mini):
    """A registry with one task per method, trained through the CLI."""
    reg = tmp_path_factory.mktemp("cli") / "registry.db"
    data = f"folder:{cifar_mini}"
    for task, extra in [("ad", ["--method", "adapter", "--rank", "8"]), ("lo", ["--method", "lora", "--rank", "4"]),
                        ("li", ["--method", "linear"]), ("fu", ["--method", "full"])]:
        out = run("train", "--dataset", data, "--task", task, *QUICK, *extra, "--registry", reg).output
        assert f"trained {task}@1" in out
    return reg


def test_every_method_is_registered_with_its_file(trained):
    reg = Registry(trained)
    tasks = {t.name: t for t in reg.tasks()}
    assert set(tasks) == {"ad", "lo", "li", "fu"}
    methods = {name: t.default.method for name, t in tasks.items()}
    assert methods == {"ad": "adapter", "lo": "lora", "li": "linear", "fu": "full"}
    for t in tasks.values():
        v = t.default
        assert reg.path_of(v).stat().st_size == v.bytes
        assert t.classes[:2] == ["airplane", "automobile"]
        assert v.metrics["test_images"] == 40 and 0 <= v.metrics["test_top1"] <= 1
        assert v.train_time_s > 0 and v.device.startswith("cpu") and v.peak_memory_mb > 0
    assert tasks["li"].default.bytes < tasks["ad"].default.bytes < tasks["fu"].default.bytes


def test_list_show_eval_predict(trained, cifar_mini):
    out = run("list", "--registry", trained).output
    for name in ("ad", "lo", "li", "fu"):
        assert name in out
    out = run("show", "ad", "--registry", trained).output
    assert "rank=8" in out and "airplane" in out and "fingerprint" in out
    out = run("eval", "lo", "--limit", "30", "--registry", trained).output
    assert "top-1" in out and "on 30 test images" in out
    image = cifar_mini / "test" / "cat" / "0000.jpg"
    out = run("predict", "ad", image, "--topk", "3", "--json", "--registry", trained).output
    preds = json.loads(out)[0]["predictions"]
    assert len(preds) == 3 and preds[0]["prob"] >= preds[1]["prob"] >= preds[2]["prob"]
    assert all(p["label"] in {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                              "truck"} for p in preds)


def test_compare_json_and_csv(trained):
    report = json.loads(run("compare", "--json", "--registry", trained).output)
    rows = {r["task"]: r for r in report["rows"]}
    assert set(rows) == {"ad", "lo", "li", "fu"}
    assert rows["ad"]["trainable_params"] < rows["ad"]["full_params"]
    pico = create_backbone(PICO, pretrained=False)
    for name in ("ad", "lo", "li", "fu"):  # the backbone counted as built, not with the task attached
        assert rows[name]["full_params"] == pico.num_params + pico.embed_dim * 10 + 10
    assert rows["ad"]["full_measured"] is False and rows["fu"]["full_measured"] is True
    assert report["tasks"] == 4 and report["full_total_bytes"] > 0
    csv_out = run("compare", "--csv", "--registry", trained).output
    assert csv_out.splitlines()[0].startswith("task,version,default,method")
    assert len(csv_out.strip().splitlines()) == 5
    assert "full fine-tuning needs" in run("compare", "--registry", trained).output


def test_export_import_remove(trained, tmp_path):
    dest = tmp_path / "ad.safetensors"
    run("export", "ad", dest, "--registry", trained)
    fails("export", "ad", dest, "--registry", trained, message="exists already")
    other = tmp_path / "other.db"
    assert "imported" in run("import", dest, "--task", "ad2", "--registry", other).output
    v = Registry(other).get_version("ad2")
    path = Registry(other).path_of(v)
    original = load_file(Registry(trained).path_of(Registry(trained).get_version("ad")))
    assert load_file(path).keys() == original.keys()
    assert all(load_file(path)[k].equal(t) for k, t in original.items())
    fails("remove", "ad2", "--registry", other, message="pass --yes")
    assert "removed ad2@1" in run("remove", "ad2", "--yes", "--registry", other).output
    assert not path.exists() and Registry(other).tasks() == []


def test_adapter_beats_chance_on_real_images(tmp_path, cifar_mini):
    reg = tmp_path / "r.db"
    run("train", "--dataset", f"folder:{cifar_mini}", "--task", "acc", "--backbone", PICO, "--no-pretrained",
        "--placement", "sequential", "--rank", "32", "--epochs", "10", "--batch-size", "32", "--lr", "3e-3",
        "--label-smoothing", "0", "--no-augment", "--registry", reg)
    top1 = Registry(reg).get_version("acc").metrics["test_top1"]
    assert top1 >= 0.17, f"test top-1 {top1:.3f} is not clearly above chance (0.10) on 200 real test images"


def test_same_seed_gives_identical_adapter_files(tmp_path, cifar_mini):
    files = []
    for n in range(2):
        (tmp_path / str(n)).mkdir()  # two registries, each with its own adapter folder
        reg = tmp_path / str(n) / "r.db"
        run("train", "--dataset", f"folder:{cifar_mini}", "--task", "det", *QUICK, "--rank", "4", "--seed", "3",
            "--registry", reg)
        files.append(Registry(reg).path_of(Registry(reg).get_version("det")).read_bytes())
    assert files[0][:400] == files[1][:400]
    assert files[0] == files[1]


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--dataset", "imagenet9", *QUICK], "unknown data set 'imagenet9'"),
    (["train", "--dataset", "folder:/no/such/dir", *QUICK], "/no/such/dir"),
    (["train", "--dataset", "cifar10", "--no-download", "--data-dir", "{tmp}", *QUICK], "folder:PATH"),
    (["train", "--dataset", "digits", "--backbone", "vit_base_patch16_224.augreg_in21k"], "--weights FILE"),
    (["train", "--dataset", "digits", "--method", "linear", "--rank", "4", *QUICK], "--rank does not apply"),
    (["train", "--dataset", "digits", "--placement", "diagonal", *QUICK], "placement must be one of"),
    (["train", "--dataset", "digits", "--tokens", "4", *QUICK], "--tokens does not apply to method 'adapter'"),
    (["train", "--dataset", "digits", "--method", "ssf", "--rank", "4", *QUICK], "--rank does not apply"),
    (["train", "--dataset", "digits", "--method", "vpt", "--prompt-mode", "wide", *QUICK], "mode must be one of"),
    (["train", "--dataset", "digits", "--weights", "{tmp}/none.pth", *QUICK], "does not exist"),
    (["train", "--dataset", "digits", "--task", "a/b", *QUICK], "bad task name"),
    (["show", "nothing"], "no task 'nothing'"),
    (["eval", "nothing@2"], "no task 'nothing'"),
    (["predict", "nothing", "x.jpg"], "no task 'nothing'"),
    (["remove", "nothing", "--yes"], "no task 'nothing'"),
    (["import", "{tmp}/missing.safetensors"], "is missing"),
])
def test_user_errors_exit_1_with_a_message(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    fails(*args, "--registry", tmp_path / "r.db", message=message)


def test_bad_image_and_bad_file(trained, tmp_path):
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    fails("predict", "ad", bad, "--registry", trained, message="is not an image")
    fails("import", bad, "--registry", tmp_path / "r.db", message="not a readable adapter file")


@pytest.mark.parametrize(("extra", "config"), [
    (["--method", "ssf"], {}),
    (["--method", "bitfit"], {}),
    (["--method", "vpt", "--tokens", "3", "--prompt-mode", "shallow", "--prompt-init", "normal"],
     {"tokens": 3, "mode": "shallow", "init": "normal", "dropout": 0.0}),
    (["--method", "adapter", "--placement", "adapterplus"],
     {"rank": 8, "placement": "adapterplus", "scale": 1.0, "dropout": 0.0, "act": "gelu", "scaling": "channel",
      "init": "houlsby"}),
])
def test_train_new_methods_records_their_settings(tmp_path, cifar_mini, extra, config):
    reg = tmp_path / "r.db"
    out = run("train", "--dataset", f"folder:{cifar_mini}", "--task", "t", *QUICK, *extra, "--registry", reg).output
    assert "trained t@1" in out
    v = Registry(reg).get_version("t")
    assert (v.method, v.config) == (extra[1], config)
    own = {k: t for k, t in load_file(Registry(reg).path_of(v)).items() if not k.startswith("routing.")}
    assert sum(t.numel() for t in own.values()) == v.trainable_params  # routing statistics are not trained


def test_every_command_with_a_registry_takes_an_adapter_store():
    import typer.main

    def commands(group, prefix=""):
        for name, cmd in group.commands.items():
            yield from commands(cmd, f"{prefix}{name} ") if hasattr(cmd, "commands") else [(prefix + name, cmd)]

    with_registry = {}
    for name, cmd in commands(typer.main.get_command(app)):
        opts = {o for p in cmd.params for o in p.opts}
        if "--registry" in opts:
            with_registry[name] = "--adapters" in opts
    assert set(with_registry) >= {"train", "list", "show", "eval", "predict", "compare", "remove", "default", "export",
                                  "import", "routing fit", "continual", "doctor", "ui"}
    assert all(with_registry.values()), [name for name, has in with_registry.items() if not has]
    assert "s3://bucket/prefix" in run("list", "--help").output


def test_train_list_predict_remove_use_the_adapter_store_given(tmp_path, cifar_mini):
    reg, store = tmp_path / "db" / "r.db", tmp_path / "store"
    reg.parent.mkdir()
    here = ["--registry", reg, "--adapters", store]
    assert "trained t@1" in run("train", "--dataset", f"folder:{cifar_mini}", "--task", "t", *QUICK, *here).output
    v = Registry(reg, adapter_dir=store).get_version("t")
    assert (store / v.file).stat().st_size == v.bytes and not (reg.parent / "adapters" / v.file).exists()
    assert "t " in run("list", *here).output
    image = cifar_mini / "test" / "cat" / "0000.jpg"
    assert json.loads(run("predict", "--task", "t", image, "--json", *here).output)[0]["task"] == "t@1"
    fails("predict", "--task", "t", image, "--registry", reg, message="is missing")  # the default store has no file
    assert "removed t@1" in run("remove", "t", "--yes", *here).output
    assert not (store / v.file).exists() and Registry(reg).tasks() == []

"""Experiment tracking: `train --log-to tensorboard --log-to mlflow` writes real runs (read back with TensorBoard's own
event reader and MLflow's client), the registry row names them, and bad trackers are one-line refusals."""

from __future__ import annotations

import os
import sys
import time

import pytest
from conftest import PICO
from safetensors.torch import load_file
from typer.testing import CliRunner

from adaptkit.cli import app
from adaptkit.errors import ConfigError
from adaptkit.registry import Registry

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

runner = CliRunner()
TRAIN = ["--backbone", PICO, "--no-pretrained", "--method", "lora", "--epochs", "2", "--batch-size", "16",
         "--limit-train", "32", "--limit-eval", "16", "--threads", "1"]


@pytest.fixture(scope="module")
def tracked(cifar_mini, tmp_path_factory):
    """One task trained with both trackers into a temporary log folder."""
    root = tmp_path_factory.mktemp("track")
    reg, logs, work = root / "r.db", root / "logs", root / "work"
    work.mkdir()
    here = os.getcwd()
    os.chdir(work)  # where MLflow's own defaults would put files
    try:
        result = runner.invoke(app, ["train", "-d", f"folder:{cifar_mini}", "--task", "pets", *TRAIN, "--log-to",
                                     "tensorboard", "--log-to", "mlflow", "--log-dir", str(logs), "--registry",
                                     str(reg)])
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    assert list(work.iterdir()) == []  # nothing outside --log-dir (MLflow's ./mlruns was)
    return reg, logs, result.output


def test_the_row_names_both_runs_and_the_cli_prints_them(tracked):
    reg, logs, output = tracked
    version = Registry(reg).get_version("pets")
    tracking = version.train["tracking"]
    assert set(tracking) == {"tensorboard", "mlflow"}
    assert tracking["tensorboard"]["log_dir"].startswith(str(logs.resolve()))
    assert tracking["mlflow"]["tracking_uri"] == f"sqlite:///{(logs / 'mlflow.db').resolve()}"
    text = " ".join(output.split())
    assert f"mlflow: run {tracking['mlflow']['run_id']} in experiment adaptkit" in text
    shown = runner.invoke(app, ["show", "pets", "--registry", str(reg)])
    assert f"tensorboard: {tracking['tensorboard']['log_dir']}" in " ".join(shown.output.split())


def test_tensorboard_holds_steps_epochs_and_the_recipe(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reg, _, _ = tracked
    version = Registry(reg).get_version("pets")
    events = EventAccumulator(version.train["tracking"]["tensorboard"]["log_dir"],
                              size_guidance={"scalars": 0, "tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/step_loss", "train/images_per_s", "train/lr", "epoch/train_top1", "epoch/val_top1",
            "epoch/val_loss"} <= scalars
    steps = [e.step for e in events.Scalars("train/step_loss")]
    assert steps == list(range(1, 5))  # 32 images / 16 per step, 2 epochs
    val = [e.value for e in events.Scalars("epoch/val_top1")]
    assert len(val) == 2 and max(val) == pytest.approx(version.metrics["val_top1"])
    assert "recipe/text_summary" in events.Tags()["tensors"]


def test_tensorboard_hparams_say_what_was_trained(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    reg, _, _ = tracked
    version = Registry(reg).get_version("pets")
    events = EventAccumulator(version.train["tracking"]["tensorboard"]["log_dir"]).Reload()
    hparams = {}
    for content in events.PluginTagToContent("hparams").values():
        data = HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            hparams.update({k: v.string_value or v.number_value for k, v in data.session_start_info.hparams.items()})
    assert hparams["task"] == "pets" and hparams["dataset"].startswith("folder:") and hparams["backbone"] == PICO
    assert hparams["method"] == "lora" and hparams["method_config.rank"] == 8


def test_mlflow_holds_params_metrics_and_the_adapter_file(tracked, tmp_path):
    from mlflow import MlflowClient

    reg, logs, _ = tracked
    registry = Registry(reg)
    version = registry.get_version("pets")
    run_info = version.train["tracking"]["mlflow"]
    client = MlflowClient(tracking_uri=run_info["tracking_uri"])
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "pets"
    params = run.data.params
    assert params["method"] == "lora" and params["epochs"] == "2" and params["method_config.rank"] == "8"
    assert run.data.metrics["final_test_top1"] == pytest.approx(version.metrics["test_top1"])
    history = client.get_metric_history(run.info.run_id, "train_step_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    (artifact,) = client.list_artifacts(run.info.run_id)
    assert run.info.artifact_uri.startswith((logs / "mlartifacts").resolve().as_uri())
    local = client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path))
    exported = registry.export("pets", tmp_path / "again.safetensors")
    assert load_file(local).keys() == load_file(exported).keys()
    assert open(local, "rb").read() == exported.read_bytes()  # the file as registered


def test_bad_trackers_are_refused_before_training(cifar_mini, tmp_path):
    reg = tmp_path / "r.db"
    result = runner.invoke(app, ["train", "-d", f"folder:{cifar_mini}", *TRAIN, "--log-to", "wandb",
                                 "--registry", str(reg)])
    assert result.exit_code == 1
    assert "unknown tracker 'wandb': use tensorboard or mlflow" in " ".join(result.output.split())
    assert not reg.exists()
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["train", "-d", f"folder:{cifar_mini}", *TRAIN, "--log-to", "tensorboard",
                                 "--log-dir", str(tmp_path / "file"), "--registry", str(reg)])
    assert result.exit_code == 1 and "is a file: give a folder" in " ".join(result.output.split())


def test_a_missing_extra_names_it(monkeypatch, tmp_path):
    from adaptkit.training.tracking import open_trackers

    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError) as info:
        open_trackers(["mlflow"], run_name="x", log_dir=tmp_path)
    assert str(info.value) == "logging to mlflow needs the tracking extra: pip install 'adaptkit[tracking]'"


@pytest.mark.parametrize("uri, words", [("http://127.0.0.1:{port}", "no MLflow server answers at"),
                                        ("file:///dev/null", "cannot start an MLflow run at file:///dev/null")])
def test_an_unusable_mlflow_store_is_one_line_within_seconds(monkeypatch, tmp_path, uri, words):
    from ports import free_port

    from adaptkit.training.tracking import open_trackers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(port=free_port()))  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        open_trackers(["mlflow"], run_name="x")
    assert time.monotonic() - start < 30  # MLflow's own retries took 150-250 s
    assert words in str(info.value) and "\n" not in str(info.value)

"""Warm starts: ``init_from`` copies an earlier task's tensors exactly, is checked, recorded, and ``auto`` picks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import PICO
from typer.testing import CliRunner

from adaptkit.artifacts import load_adapter
from adaptkit.cli import app
from adaptkit.data import load_task_data
from adaptkit.errors import ConfigError, NotFoundError
from adaptkit.methods import get_method
from adaptkit.training import TrainConfig, train, warmstart

ONE = TrainConfig(epochs=1, batch_size=16, limit_train=32, limit_eval=16, augment=False)
SMALL = {"rank": 4}


@pytest.fixture
def source(pico, registry):
    """Task ``src`` (digits, adapter r=4) trained one epoch: its tensors are no longer the identity's."""
    train("digits", task="src", backbone=pico, method_config=SMALL, config=ONE, registry=registry)
    state, _ = load_adapter(registry.path_of(registry.get_version("src")))
    return state


def _data(pico, spec):
    return load_task_data(spec, pico.data_config, augment=False, limit_train=32, limit_eval=16)


def test_apply_copies_the_method_tensors_exactly_and_the_head_only_for_the_same_classes(pico, registry, source,
                                                                                      cifar_mini):
    method = get_method("adapter", SMALL)
    for spec, head_copied in (("digits", True), (f"folder:{cifar_mini}", False)):
        data = _data(pico, spec)
        warm = warmstart.choose("src", registry=registry, backbone=pico, method=method, data=data)
        task = method.attach(pico.model, len(data.classes))
        fresh_head = task.head.weight.detach().clone()
        warmstart.apply(task, warm, data.classes)
        state = task.state()
        assert all(torch.equal(state[k], source[k]) for k in state if not k.startswith("head."))
        assert torch.equal(state["head.weight"], source["head.weight"] if head_copied else fresh_head)
        assert warm.record()["head"] == ("copied" if head_copied else "new")
        task.detach_from_trunk()


def test_train_starts_from_the_source_and_records_it(pico, registry, source, cifar_mini):
    still = dataclasses.replace(ONE, lr=1e-9, weight_decay=0.0)  # so the end state shows the start state
    result = train(f"folder:{cifar_mini}", task="new", backbone=pico, method_config=SMALL, config=still,
                   registry=registry, init_from="src@1")
    state = result.model.state()
    for k in state:
        if not k.startswith("head."):
            torch.testing.assert_close(state[k], source[k], atol=1e-6, rtol=0)
    assert result.version.train["init_from"] == {"ref": "src@1", "sha256": registry.get_version("src").sha256,
                                                 "auto": False, "head": "new"}
    cold = train(f"folder:{cifar_mini}", task="cold", backbone=pico, method_config=SMALL, config=still,
                 registry=registry)
    assert "init_from" not in cold.version.train
    up = "blocks.0.mlp.adapter.up.weight"
    assert cold.model.state()[up].abs().max() < 1e-6 < source[up].abs().max()  # a cold start is the identity


@pytest.mark.parametrize(("method", "config", "message"), [
    ("adapter", {"rank": 8}, "rank=4 (this run: 8)"),
    ("lora", {}, "this run trains lora"),
    ("adapter", {"rank": 4, "blocks": 2}, "blocks=None (this run: 2)"),
])
def test_a_source_of_another_method_or_setting_is_refused(pico, registry, source, method, config, message):
    with pytest.raises(ConfigError, match="a warm start needs the same method") as info:
        warmstart.choose("src", registry=registry, backbone=pico, method=get_method(method, config),
                         data=_data(pico, "digits"))
    assert message in str(info.value)


def test_a_source_on_another_backbone_or_missing_is_refused(pico, registry, source):
    other = dataclasses.replace(pico, fingerprint="0" * 64)
    with pytest.raises(ConfigError, match="was trained on backbone vit_pico_patch4_32"):
        warmstart.choose("src", registry=registry, backbone=other, method=get_method("adapter", SMALL), data=None)
    with pytest.raises(NotFoundError, match="no task 'nope'"):
        warmstart.choose("nope", registry=registry, backbone=pico, method=get_method("adapter", SMALL), data=None)
    with pytest.raises(NotFoundError, match="has no version 7"):
        warmstart.choose("src@7", registry=registry, backbone=pico, method=get_method("adapter", SMALL), data=None)


def test_auto_picks_the_task_with_the_closest_data(pico, registry, source, cifar_mini):
    train(f"folder:{cifar_mini}", task="photos", backbone=pico, method_config=SMALL, config=ONE, registry=registry)
    train(f"folder:{cifar_mini}", task="photos-lora", backbone=pico, method="lora", config=ONE, registry=registry)
    method = get_method("adapter", SMALL)
    digits = warmstart.choose("auto", registry=registry, backbone=pico, method=method, data=_data(pico, "digits"))
    photos = warmstart.choose("auto", registry=registry, backbone=pico, method=method,
                              data=_data(pico, f"folder:{cifar_mini}"))
    assert (digits.ref, photos.ref) == ("src@1", "photos@1")
    assert set(digits.scores) == {"src@1", "photos@1"}  # the LoRA task cannot be a start for an adapter
    assert digits.similarity == max(digits.scores.values()) and digits.record()["auto"] is True


def test_auto_with_no_compatible_task_is_a_recorded_cold_start(pico, registry, source):
    result = train("digits", task="again", backbone=pico, method_config={"rank": 2}, config=ONE, registry=registry,
                   init_from="auto")
    info = result.version.train["init_from"]
    assert info["ref"] is None and "cold start" in info["note"]


def test_stored_class_statistics_give_the_mean_feature():
    means, counts = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([3, 1])
    mean = warmstart._stored_mean({"routing.means": means, "routing.counts": counts}, dim=2)
    assert torch.allclose(mean, torch.tensor([0.75, 0.25]))
    assert warmstart._stored_mean({"routing.means": means, "routing.counts": counts}, dim=3) is None


def test_cli_init_from_and_blocks(tmp_path):
    reg = tmp_path / "r.db"
    base = ["train", "--dataset", "digits", "--backbone", PICO, "--no-pretrained", "--epochs", "1", "--limit-train",
            "32", "--limit-eval", "16", "--no-augment", "--rank", "4", "--registry", reg]
    runner = CliRunner()
    first = runner.invoke(app, [str(a) for a in [*base, "--task", "a", "--blocks", "2"]])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [str(a) for a in [*base, "--task", "b", "--blocks", "2", "--init-from", "auto"]])
    assert second.exit_code == 0, second.output
    assert "warm start from a@1 (cosine 1.000 to the new data, head copied)" in second.output
    bad = runner.invoke(app, [str(a) for a in [*base, "--task", "c", "--init-from", "a"]])
    assert bad.exit_code == 1 and "blocks=2 (this run: None)" in bad.output and "Traceback" not in bad.output

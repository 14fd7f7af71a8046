"""Skipping work: cached frozen features, ``blocks`` (modules only in the last K blocks), activation checkpointing."""

from __future__ import annotations

import importlib

import pytest
import torch

from adaptkit.backbone import fingerprint
from adaptkit.data import load_task_data
from adaptkit.errors import ConfigError
from adaptkit.inference import Predictor, split_state
from adaptkit.methods import get_method
from adaptkit.methods.base import TaskSite
from adaptkit.training import TrainConfig, train
from adaptkit.training.checkpointing import activation_checkpointing
from adaptkit.training.feature_cache import CachedTask, first_trainable_block, prepare, run_prefix, run_suffix

NO_AUG = TrainConfig(epochs=2, batch_size=16, limit_train=48, limit_eval=24, augment=False)


@pytest.mark.parametrize("start", [0, 1, 3, 4])
def test_prefix_then_suffix_equals_the_trunk(pico, images, start):
    trunk = pico.model
    with torch.no_grad():
        whole = trunk(images)
        if start == 0:
            return
        split = run_suffix(trunk, run_prefix(trunk, images, start), start)
    assert torch.equal(split, whole)


@pytest.mark.parametrize(("method", "config", "start"), [
    ("linear", {}, 4), ("adapter", {"blocks": 1}, 3), ("lora", {"blocks": 2}, 2), ("full", {"blocks": 1}, 3),
])
def test_feature_cache_gives_the_same_weights_as_the_uncached_run(pico, registry, method, config, start):
    data = load_task_data("digits", pico.data_config, augment=False, limit_train=48, limit_eval=24)
    task = get_method(method, config).attach(pico.model, 10)
    try:
        assert first_trainable_block(task) == start
        _, net = prepare(task, data, batch_size=32, workers=0, device=torch.device("cpu"))
        assert isinstance(net, CachedTask) and net.start == start  # the cache is really used
    finally:
        if method != "full":
            task.detach_from_trunk()
    runs = [train("digits", task=f"{method}{i}", backbone=pico, method=method, method_config=config,
                  registry=registry, config=TrainConfig(**{**vars(NO_AUG), "feature_cache": cached}))
            for i, cached in enumerate((True, False))]
    cached, plain = (r.model.state() for r in runs)
    assert cached.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-4, atol=1e-5)
    assert runs[0].metrics["test_top1"] == runs[1].metrics["test_top1"]


def test_no_cache_with_augmentation_or_a_trainable_prefix(pico):
    augmented = load_task_data("digits", pico.data_config, augment=True, limit_train=8, limit_eval=8)
    plain = load_task_data("digits", pico.data_config, augment=False, limit_train=8, limit_eval=8)
    linear = get_method("linear").attach(pico.model, 10)
    full = get_method("full").attach(pico.model, 10)
    for task, data in ((linear, augmented), (full, plain)):
        same_data, net = prepare(task, data, batch_size=8, workers=0, device=torch.device("cpu"))
        assert net is task and same_data is data


@pytest.mark.parametrize(("method", "config"), [
    ("adapter", {"blocks": 2}), ("lora", {"blocks": 1, "targets": ("qkv", "fc1")}), ("ssf", {"blocks": 2}),
    ("bitfit", {"blocks": 1}), ("vpt", {"blocks": 2, "tokens": 3}), ("vpt", {"blocks": 3, "mode": "shallow"}),
])
def test_blocks_puts_modules_only_in_the_last_blocks(pico, images, method, config):
    before = fingerprint(pico.model)
    task = get_method(method, config).attach(pico.model, 3)
    first = 4 - config["blocks"]
    in_blocks = [name for name in task.parts if name.startswith("blocks.")]  # others follow the blocks (final norm)
    assert in_blocks and all(int(name.split(".")[1]) >= first for name in in_blocks)
    assert all(n.startswith(("blocks.", "norm.", "fc_norm.")) for n in task.parts)  # nothing before block `first`
    assert not any(isinstance(m, TaskSite) for i in range(first) for m in pico.model.blocks[i].modules())
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in pico.model.blocks]
    task.train()
    torch.nn.functional.cross_entropy(task(images), torch.tensor([0, 1, 2, 0])).backward()
    for h in hooks:
        h.remove()
    assert [o.requires_grad for o in outputs] == [i >= first for i in range(4)]  # the backward stops at block k
    assert all(p.grad is not None for p in task.trainable_parameters())
    torch.optim.SGD(task.trainable_parameters(), lr=1.0).step()
    task.detach_from_trunk()
    assert fingerprint(pico.model) == before


def test_full_with_blocks_trains_and_saves_only_the_last_blocks(pico, registry, images):
    result = train("digits", task="partial", backbone=pico, method="full", method_config={"blocks": 1},
                   registry=registry, config=NO_AUG)
    state = result.model.state()
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in state if k.startswith("blocks.")} == {"blocks.3"}
    assert result.version.config["blocks"] == 1
    assert result.version.trainable_params == sum(t.numel() for t in state.values())
    own = result.model.trunk
    for i in range(3):  # the frozen prefix of the private copy is the shared backbone's
        for a, b in zip(own.blocks[i].parameters(), pico.model.blocks[i].parameters(), strict=True):
            assert torch.equal(a, b) and not a.requires_grad
    predictor = Predictor(registry)
    loaded = predictor.activate("partial")
    with torch.no_grad():
        assert torch.allclose(loaded.model(images), result.model.eval()(images), atol=1e-6)


@pytest.mark.parametrize(("method", "config", "message"), [
    ("linear", {"blocks": 1}, "nothing in the blocks: blocks does not apply"),
    ("adapter", {"blocks": 0}, "positive number"),
    ("adapter", {"blocks": 5}, "has 4 blocks: pick 1 to 4"),
])
def test_bad_blocks(pico, method, config, message):
    with pytest.raises(ConfigError, match=message):
        get_method(method, config).attach(pico.model, 2)
    assert not hasattr(pico.model.blocks[0].mlp, "base_layer")


@pytest.mark.parametrize("method", ["adapter", "full"])
def test_checkpointing_gives_the_same_gradients(pico, images, method):
    task = get_method(method, {"rank": 4} if method == "adapter" else {}).attach(pico.model, 3)
    for module in task.parts.values():
        if method == "adapter":  # off the identity, so that every tensor gets a gradient
            torch.nn.init.normal_(module.up.weight, std=0.1)
    task.train()
    labels = torch.tensor([0, 1, 2, 0])
    grads = []
    for on in (False, True):
        with activation_checkpointing(task.trunk, on):
            assert task.trunk.grad_checkpointing is on
            for p in task.trainable_parameters():
                p.grad = None
            torch.nn.functional.cross_entropy(task(images), labels).backward()
        grads.append([p.grad.clone() for p in task.trainable_parameters()])
    assert task.trunk.grad_checkpointing is False  # restored
    assert all(g.abs().sum() > 0 for g in grads[0][:4])  # the first block's tensors: the backward reached them
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_checkpointing_through_train_records_the_option(pico, registry):
    cfg = TrainConfig(epochs=1, batch_size=16, limit_train=16, limit_eval=16, checkpointing=True)
    result = train("digits", task="ck", backbone=pico, registry=registry, config=cfg)
    assert result.version.train["recipe"]["checkpointing"] is True
    assert pico.model.grad_checkpointing is False


def _vtab():
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy"))
    return importlib.import_module("vtab_table")


def test_vtab_1k_draws_800_train_and_200_val_seeded():
    vtab = _vtab()
    train_idx, val_idx = vtab.vtab_1k(5000, seed=3)
    assert (len(train_idx), len(val_idx)) == (800, 200) and not set(train_idx) & set(val_idx)
    assert max(train_idx + val_idx) < 5000 and vtab.vtab_1k(5000, seed=3) == (train_idx, val_idx)
    with pytest.raises(ValueError, match="needs 1000 training images"):
        vtab.vtab_1k(999)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine with no GPU")
def test_vtab_table_stops_at_once_offline_and_says_why():
    with pytest.raises(SystemExit) as info:
        _vtab().main(["--tasks", "dtd", "--only", "linear"])
    message = str(info.value)
    assert "cannot run here: it needs a CUDA GPU" in message
    assert "benchmarks/accuracy/method_table.py is the table that runs" in message


def test_routing_statistics_are_read_from_cached_frozen_features(pico, registry, monkeypatch):
    """A linear probe's cache holds the frozen pooled features of its training images: its routing statistics come
    from there, with no second pass, and equal (bit for bit) those of the pass; an adapter's cache does not."""
    train_module = importlib.import_module("adaptkit.training.pipeline")  # where train() collects the statistics
    passes = []
    real = train_module.collect_task_stats
    monkeypatch.setattr(train_module, "collect_task_stats", lambda *a, **k: passes.append(1) or real(*a, **k))
    runs = [train("digits", task=f"t{i}", backbone=pico, method=method, registry=registry,
                  config=TrainConfig(**{**vars(NO_AUG), "feature_cache": cached}))
            for i, (method, cached) in enumerate((("linear", True), ("linear", False), ("adapter", True)))]
    assert len(passes) == 2  # the uncached probe and the adapter (its cache holds tokens before its blocks)
    cached, plain, adapter = (split_state(registry.load_version(r.version)[0])[1].to_tensors() for r in runs)
    assert cached.keys() == plain.keys()
    for k in plain:
        assert torch.equal(cached[k], plain[k]), k
        assert torch.equal(adapter[k], plain[k]), k  # the frozen backbone's statistics whatever the method

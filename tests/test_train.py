"""The training loop: schedule, best epoch, interruption, and the shared backbone left as it was."""

from __future__ import annotations

import math

import pytest
import torch

from adaptkit.backbone import fingerprint
from adaptkit.errors import ConfigError
from adaptkit.training import METHOD_DEFAULTS, TrainConfig, TrainEvent, evaluate, lr_factor, train

QUICK = TrainConfig(epochs=2, batch_size=32, limit_train=64, limit_eval=32)


def test_lr_schedule_warms_up_then_decays_to_floor():
    values = [lr_factor(s, warmup_steps=10, total_steps=110, floor=0.01) for s in range(110)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:10], values[1:10], strict=False))  # rising during warm-up
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))  # falling after
    assert values[60] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(500, 10, 110, 0.01) == pytest.approx(0.01)


def test_train_leaves_shared_backbone_unchanged_and_reports(pico, registry, cifar_mini):
    before = fingerprint(pico.model)
    events: list[TrainEvent] = []
    result = train(f"folder:{cifar_mini}", task="t", backbone=pico, config=QUICK, registry=registry,
                   on_event=events.append)
    assert fingerprint(pico.model) == before
    assert not any(p.requires_grad for p in pico.model.parameters())
    assert {e.phase for e in events} == {"train", "val", "test", "save"}
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.metrics["best_epoch"] in (1, 2)
    assert result.version.train["recipe"]["lr"] == METHOD_DEFAULTS["adapter"]["lr"] * 32 / 256  # default, scaled
    assert result.version.train["images_per_s"] > 0
    m = evaluate("t", registry=registry, limit=32)
    assert m["top1"] == pytest.approx(result.metrics["test_top1"])  # the same weights, the same test images


def test_fit_trains_in_memory_with_no_registry_and_equals_train(pico, registry, cifar_mini, tmp_path, monkeypatch):
    from adaptkit.data import load_task_data
    from adaptkit.methods import get_method
    from adaptkit.training import fit, seed_everything

    monkeypatch.chdir(tmp_path)  # nothing may appear where it runs
    cfg = QUICK  # lr and weight decay None: fit() takes the method's, as train() does
    data = load_task_data(f"folder:{cifar_mini}", pico.data_config, seed=cfg.seed, augment=cfg.augment,
                          val_fraction=cfg.val_fraction, limit_train=cfg.limit_train, limit_eval=cfg.limit_eval)
    seed_everything(cfg.seed)
    model = get_method("adapter").attach(pico.model, len(data.classes))
    try:
        got = fit(model, data, cfg, device=torch.device("cpu"))
    finally:
        model.detach_from_trunk()
    assert list(tmp_path.iterdir()) == []
    assert [h["epoch"] for h in got.history] == [1, 2] and got.search is None
    assert got.config.lr == QUICK.resolved("adapter").lr
    assert set(got.metrics) == {"val_top1", "best_epoch", "test_top1", "test_top5", "test_loss", "test_images"}
    with pytest.raises(ConfigError, match="must be a task model"):
        fit(pico.model, data, cfg, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="must be a TrainConfig"):
        fit(model, data, {"epochs": 1}, device=torch.device("cpu"))
    with_registry = train(f"folder:{cifar_mini}", task="t", backbone=pico, config=QUICK, registry=registry)
    assert with_registry.metrics == pytest.approx(got.metrics)  # train() is fit() plus the data and the registry


def test_interrupt_leaves_no_row_and_no_file(pico, registry, cifar_mini):
    def stop(event: TrainEvent) -> None:
        if event.phase == "val":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(f"folder:{cifar_mini}", task="t", backbone=pico, config=QUICK, registry=registry, on_event=stop)
    assert registry.tasks() == []
    assert not registry.adapter_dir.exists() or not any(registry.adapter_dir.rglob("*.safetensors"))
    assert not hasattr(pico.model.blocks[0].mlp, "base_layer")  # the adapter came off the backbone


@pytest.mark.parametrize(("values", "message"), [
    ({"epochs": 0}, "epochs must be"), ({"batch_size": 0}, "batch_size must be"), ({"lr": -1.0}, "lr must be"),
    ({"precision": "fp8"}, "precision must be"), ({"label_smoothing": 1.5}, "label_smoothing must be"),
])
def test_bad_recipe(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_cpu_bf16_runs(pico, registry, cifar_mini):
    cfg = TrainConfig(epochs=1, batch_size=16, limit_train=16, limit_eval=16, precision="bf16")
    result = train(f"folder:{cifar_mini}", task="b", backbone=pico, config=cfg, registry=registry)
    assert all(t.dtype == torch.float32 for t in result.model.state().values())  # weights stay fp32


def _torchrun_train(tmp_path, cifar_mini, processes: int):
    """``adaptkit train`` under torchrun with ``processes`` ranks (gloo on the CPU); the registry it wrote."""
    import os
    import subprocess
    import sys

    from adaptkit.registry import Registry

    reg = tmp_path / "r.db"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "adaptkit.cli",
           "train", "--dataset", f"folder:{cifar_mini}", "--task", "ddp", "--backbone", "vit_pico_patch4_32",
           "--no-pretrained", "--epochs", "1", "--batch-size", "16", "--limit-train", "64", "--limit-eval", "16",
           "--registry", str(reg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return Registry(reg)


def test_two_process_ddp_writes_one_version(tmp_path, cifar_mini):
    """Under torchrun (gloo on the CPU) both ranks train; only rank 0 writes the file and the row. (One process under
    ``torchrun --nproc_per_node 1``, DDP's code path on one GPU, is the GPU script's torchrun part: test_gpu_script.)"""
    registry = _torchrun_train(tmp_path, cifar_mini, 2)
    [task] = registry.tasks()
    assert [v.version for v in task.versions] == [1]
    assert task.versions[0].train["world_size"] == 2
    assert task.versions[0].train["ddp_backend"] == "gloo"
    assert len([p for p in registry.adapter_dir.rglob("*.safetensors") if p.is_file()]) == 1

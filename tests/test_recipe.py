"""Training defaults: the learning rate scaled with the batch, --lr auto, augmentation levels, threads, the recipe."""

from __future__ import annotations

import pytest
import torch
from conftest import PICO
from PIL import Image
from safetensors.torch import load_file
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from typer.testing import CliRunner

from adaptkit.artifacts import read_meta
from adaptkit.cli import app
from adaptkit.data import build_transform
from adaptkit.errors import ConfigError
from adaptkit.registry import Registry
from adaptkit.threads import default_threads
from adaptkit.training import METHOD_DEFAULTS, TrainConfig, train
from adaptkit.training.lr_search import LR_FACTORS, lr_candidates, search_lr
from adaptkit.training.recipe import describe_recipe

CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
       "crop_pct": 1.0}
TINY = {"epochs": 2, "batch_size": 16, "limit_train": 32, "limit_eval": 16, "threads": 1}


@pytest.mark.parametrize("method", ["adapter", "lora", "linear", "full"])
def test_default_lr_scales_linearly_with_the_batch(method):
    base = METHOD_DEFAULTS[method]["lr"]
    assert TrainConfig(batch_size=256).resolved(method).lr == pytest.approx(base)
    assert TrainConfig(batch_size=64).resolved(method).lr == pytest.approx(base / 4)
    assert TrainConfig(batch_size=64, lr=0.5).resolved(method).lr == 0.5  # a rate given by hand is kept as is
    assert TrainConfig(lr="auto").resolved(method).lr == "auto"


@pytest.mark.parametrize(("values", "message"), [
    ({"lr": "fast"}, "lr must be a number greater than 0, 'auto' or None"), ({"lr": 0.0}, "lr must be"),
    ({"lr": float("nan")}, "lr must be"), ({"lr": True}, "lr must be"),
    ({"threads": 0}, "threads must be"), ({"threads": 1.5}, "threads must be"),
    ({"augment": "heavy"}, "use one of none, light, strong"),
    ({"lr": "auto", "val_fraction": 0.0}, "picks the rate on the validation split"),
])
def test_bad_recipe_values(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_augment_levels_and_old_booleans():
    assert [TrainConfig(augment=a).augment for a in (False, True, "STRONG", "none")] == \
           ["none", "light", "strong", "none"]


def _steps(level: str, flip: bool) -> list:
    return build_transform(CFG, train=True, augment=level, flip=flip).transform.transforms


@pytest.mark.parametrize(("level", "scale"), [("light", (0.6, 1.0)), ("strong", (0.08, 1.0))])
def test_levels_crop_as_named_and_flip_only_when_asked(level, scale):
    crop = next(t for t in _steps(level, False) if isinstance(t, RandomResizedCropAndInterpolation))
    assert tuple(crop.scale) == scale
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in _steps(level, False))
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in _steps(level, True))
    assert any(isinstance(t, T.ColorJitter) for t in _steps(level, False)) == (level == "strong")


def test_no_augmentation_is_the_eval_transform():
    img = Image.fromarray(torch.randint(0, 255, (40, 48, 3), dtype=torch.uint8).numpy())
    train_tf = build_transform(CFG, train=True, augment="none", flip=True)
    assert torch.equal(train_tf(img), build_transform(CFG, train=False)(img))
    assert torch.equal(train_tf(img), train_tf(img))


def test_search_picks_the_best_and_the_default_on_a_tie():
    assert lr_candidates(1e-3) == pytest.approx([f * 1e-3 for f in sorted(LR_FACTORS)])
    peaked = search_lr(lambda i, lr: -abs(lr - 2e-3), 1e-3, epochs=1, images=10)
    assert peaked.chosen == pytest.approx(2e-3) and len(peaked.trials) == len(LR_FACTORS)
    assert search_lr(lambda i, lr: 0.5, 1e-3, epochs=1, images=10).chosen == pytest.approx(1e-3)


def test_lr_auto_reports_records_and_equals_training_at_the_chosen_rate(pico, tmp_path, cifar_mini):
    for name in "ab":  # one registry each, with its own adapter folder
        (tmp_path / name).mkdir()
    events = []
    auto = train(f"folder:{cifar_mini}", task="t", backbone=pico, registry=tmp_path / "a" / "r.db",
                 config=TrainConfig(lr="auto", **TINY), on_event=events.append)
    recipe = auto.version.train["recipe"]
    chosen = [e.lr for e in events if e.phase == "lr"]
    assert chosen == [recipe["lr"]] and recipe["lr_given"] == "auto"
    assert {e.lr for e in events if e.phase == "search"} == {t["lr"] for t in recipe["lr_search"]["trials"]}
    assert len(recipe["lr_search"]["trials"]) == len(LR_FACTORS)
    by_hand = train(f"folder:{cifar_mini}", task="t", backbone=pico, registry=tmp_path / "b" / "r.db",
                    config=TrainConfig(lr=recipe["lr"], **TINY))
    files = [Registry(tmp_path / n / "r.db").path_of(v.version) for n, v in (("a", auto), ("b", by_hand))]
    first, second = (load_file(f) for f in files)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_recipe_is_recorded_and_threads_are_restored(pico, registry, tmp_path, cifar_mini):
    before = torch.get_num_threads()
    result = train(f"folder:{cifar_mini}", task="t", backbone=pico, registry=registry,
                   config=TrainConfig(augment="strong", flip=True, **TINY))
    assert torch.get_num_threads() == before
    recipe = result.version.train["recipe"]
    assert recipe["lr_given"] is None and recipe["lr"] == pytest.approx(METHOD_DEFAULTS["adapter"]["lr"] * 16 / 256)
    assert (recipe["augment"], recipe["flip"], recipe["threads"], recipe["device"]) == ("strong", True, 1, "cpu")
    assert (recipe["epochs"], recipe["batch_size"], recipe["seed"]) == (2, 16, 0)
    assert "augment strong + flip" in describe_recipe(result.version.train)
    exported = registry.export(result.version.ref, tmp_path / "t.safetensors")  # the file carries its recipe
    assert read_meta(exported).recipe == recipe
    (tmp_path / "other").mkdir()
    assert Registry(tmp_path / "other" / "r.db").import_file(exported).train["recipe"] == recipe
    assert 1 <= default_threads() <= 4


@pytest.mark.parametrize(("cores", "load", "threads"), [(2, 0.1, 2), (2, 1.2, 1), (2, 30.0, 1), (16, 0.0, 4),
                                                         (16, 13.6, 2), (1, 0.0, 1)])
def test_default_threads_leave_busy_cores_alone(cores, load, threads):
    assert default_threads(cores, load) == threads


def test_cli_options_and_show(tmp_path, cifar_mini):
    runner, reg = CliRunner(), tmp_path / "r.db"
    base = ["train", "--dataset", f"folder:{cifar_mini}", "--backbone", PICO, "--no-pretrained", "--epochs", "1",
            "--batch-size", "16", "--limit-train", "16", "--limit-eval", "16", "--registry", str(reg)]
    for extra, message in [(["--lr", "fast"], "bad --lr 'fast'"), (["--augment", "heavy"], "use one of none"),
                           (["--no-augment", "--augment", "strong"], "--no-augment contradicts --augment strong")]:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 1 and message in result.output, result.output
    assert not reg.exists() or Registry(reg).tasks() == []
    result = runner.invoke(app, [*base, "--lr", "2e-3", "--no-augment", "--threads", "1"])
    assert result.exit_code == 0, result.output
    shown = runner.invoke(app, ["show", "cifar10-mini", "--registry", str(reg)]).output
    assert "recipe lr 0.002, 1 epoch, batch 16, warm-up 1.0, weight decay 0.0001, augment none, seed 0, cpu, " \
           "1 thread" in " ".join(shown.split())


def _recipe_table():
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy"))
    return importlib.import_module("recipe_table")


def test_recipe_table_reuses_a_logged_run_only_at_its_seed_and_averages_seeds(capsys):
    table = _recipe_table()
    default = TrainConfig().resolved("adapter").lr
    line = {"dataset": "d", "method": "adapter", "lr": default, "augment": "light", "epochs": 10, "limit_train": None}
    job = ("d", "folder:x", "adapter", None, {"seed": 1})
    assert table.same_run({**line, "seed": 1}, job)
    assert not table.same_run({**line, "seed": 0}, job)  # another seed is another run
    assert not table.same_run({**line, "seed": 1, "epochs": 5}, job)
    assert table.same_run({**line, "seed": 1}, ("d", "folder:x", "adapter", default, {"seed": 1}))  # the rate by hand

    runs = [{"dataset": "d", "method": "linear", "lr_given": None, "lr": 0.01, "test_top1": t} for t in (30.0, 40.0)]
    runs += [{"dataset": "d", "method": "adapter", "lr_given": None, "lr": default, "test_top1": t} for t in (50, 52)]
    runs += [{"dataset": "d", "method": "adapter", "lr_given": 3 * default, "lr": 3 * default, "test_top1": t}
             for t in (54, 49)]
    table.table(runs, ["d"])
    row = capsys.readouterr().out.splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["d", "35.0", "51.0"]  # the means of the two seeds
    assert cells[5:7] == ["+16.0", "-0.5"]  # against the probe; against the best rate (3x: 51.5)

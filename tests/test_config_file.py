"""Recipe files: `adaptkit train --config FILE` (keys are train's options, the command line wins, a wrong key or
value is one line naming the file) and `adaptkit show TASK --recipe`, which writes a file that trains the version
again, bit for bit on the same machine."""

from __future__ import annotations

import pytest
import yaml
from conftest import PICO
from safetensors.torch import load_file
from typer.testing import CliRunner

from adaptkit.cli import app
from adaptkit.registry import Registry

runner = CliRunner()


def _run(*argv: str):
    return runner.invoke(app, list(argv))


@pytest.fixture
def mini(cifar_mini, tmp_path):
    """A LoRA task trained with a few non-default options, and its registry."""
    reg = tmp_path / "r.db"
    result = _run("train", "-d", f"folder:{cifar_mini}", "--task", "pets", "--backbone", PICO, "--no-pretrained",
                  "--method", "lora", "--rank", "4", "--targets", "qkv,fc1", "--epochs", "2", "--batch-size", "16",
                  "--limit-train", "32", "--limit-eval", "16", "--lr", "auto", "--seed", "3", "--flip",
                  "--threads", "1", "--registry", str(reg))
    assert result.exit_code == 0, result.output
    return reg


def test_show_recipe_trains_the_same_version_again(mini, tmp_path):
    shown = _run("show", "pets", "--recipe", "--registry", str(mini))
    assert shown.exit_code == 0, shown.output
    recipe = yaml.safe_load(shown.stdout)
    assert recipe["method"] == "lora" and recipe["rank"] == 4 and recipe["targets"] == "qkv,fc1"
    assert recipe["seed"] == 3 and recipe["flip"] is True and recipe["pretrained"] is False
    assert isinstance(recipe["lr"], float)  # the rate --lr auto chose, so the search need not run again
    assert "# note: lr" in shown.stdout and "--lr auto" in shown.stdout
    file = tmp_path / "recipe.yaml"
    file.write_text(shown.stdout)
    again = _run("train", "--config", str(file), "--registry", str(mini))
    assert again.exit_code == 0, again.output
    reg = Registry(mini)
    first, second = (load_file(reg.path_of(reg.get_version(f"pets@{n}"))) for n in (1, 2))
    assert sorted(first) == sorted(second)
    assert all((first[k] == second[k]).all() for k in first)
    assert reg.get_version("pets@2").metrics == reg.get_version("pets@1").metrics


def test_every_key_show_writes_is_a_train_option(mini):
    from typer.main import get_command

    train = get_command(app).commands["train"]
    options = {p.name for p in train.params}
    recipe = yaml.safe_load(_run("show", "pets", "--recipe", "--registry", str(mini)).stdout)
    assert {k.replace("-", "_") for k in recipe} <= options


def test_the_command_line_wins_over_the_file(cifar_mini, tmp_path):
    file = tmp_path / "r.yaml"
    file.write_text(f"dataset: folder:{cifar_mini}\nbackbone: {PICO}\npretrained: false\nepochs: 3\n"
                    "limit_train: 16\nlimit-eval: 8\nflip: true\nmethod: linear\n")
    reg = tmp_path / "r.db"
    result = _run("train", "--config", str(file), "--epochs", "1", "--no-flip", "--task", "cli", "--registry",
                  str(reg))
    assert result.exit_code == 0, result.output
    recipe = Registry(reg).get_version("cli").train["recipe"]
    assert recipe["epochs"] == 1 and recipe["flip"] is False  # given on the command line
    assert recipe["limit_train"] == 16 and recipe["limit_eval"] == 8  # from the file, either spelling


@pytest.mark.parametrize(("text", "fragment"), [
    ("dataset: digits\nbatchsize: 3\n", "key 'batchsize' is not an option of `train`: did you mean 'batch-size'?"),
    ("registry: other.db\n", "key 'registry' is chosen on the command line"),
    ("- digits\n", "must hold a mapping of option: value, got a list"),
    ("epochs: ten\n", "epochs: Invalid value for '--epochs'"),
    ("flip: maybe\n", "flip: 'maybe' is not a yes/no value"),
    ("epochs: true\n", "epochs: True is not a number or name value"),
    ("epochs: [1, 2]\n", "epochs takes one value, got list"),
    ("epochs: 1\nepochs-: {\n", "is not valid YAML"),
    ("batch_size: 8\nbatch-size: 9\n", "batch-size is given twice"),
    ("dataset: digits\nepochs: 1\nepochs: 2\n", "line 3: key 'epochs' is given twice (first on line 2)"),
    ("log-dir: /tmp/elsewhere\n", "key 'log-dir' is chosen on the command line"),
    ("data_dir: /tmp/elsewhere\n", "key 'data_dir' is chosen on the command line"),
    ("adapters: s3://x/y\n", "key 'adapters' is chosen on the command line"),
    ("dataset: &d digits\ntask: *d\n", "line 1: YAML anchors and aliases (&name, *name) are not read in recipe"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
     "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n"
     "epochs: [*h, *h, *h, *h, *h, *h, *h, *h, *h]\n", "YAML anchors and aliases"),  # "billion laughs"
    ("epochs: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested more than 8 levels deep"),
    ("epochs: {a: {b: {c: {d: {e: {f: {g: {h: {i: 1}}}}}}}}}\n", "line 1: nested more than 8 levels deep"),
    ("num-workers: 100000\n", "num-workers: num_workers must be a whole number in [0, 64] or None, got 100000"),
], ids=lambda value: " ".join(str(value).split())[:40])
def test_a_bad_file_is_one_line_naming_it(tmp_path, text, fragment):
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    result = _run("train", "--config", str(file), "-d", "digits", "--registry", str(tmp_path / "r.db"))
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split()), result.output
    assert "bad.yaml" in result.output and "Traceback" not in result.output
    assert len(result.output) < 2000  # no value is expanded into the message
    assert not (tmp_path / "r.db").exists()


def test_num_workers_is_capped_wherever_it_is_given(tmp_path):
    from adaptkit.errors import ConfigError
    from adaptkit.training import TrainConfig

    with pytest.raises(ConfigError, match="num_workers must be a whole number in \\[0, 64\\]"):
        TrainConfig(num_workers=100_000)
    assert TrainConfig(num_workers=64).num_workers == 64
    result = _run("train", "-d", "digits", "--num-workers", "65", "--registry", str(tmp_path / "r.db"))
    assert result.exit_code == 1 and "num_workers must be a whole number in [0, 64]" in " ".join(result.output.split())
    assert not (tmp_path / "r.db").exists()


def test_a_missing_or_huge_file_is_refused(tmp_path):
    result = _run("train", "--config", str(tmp_path / "nope.yaml"), "-d", "digits")
    assert result.exit_code == 2 and "nope.yaml does not exist" in result.output
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    result = _run("train", "--config", str(big), "-d", "digits")
    assert result.exit_code == 2 and "is over 1 MiB" in result.output

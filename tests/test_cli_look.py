"""What a person sees: help like a normal CLI's, tables that fit 80 columns without cutting a value, plain output
when piped, one plain line per epoch in a log."""

from __future__ import annotations

import io
import re

import pytest
from conftest import PICO
from rich.console import Console
from typer.testing import CliRunner

from adaptkit.cli import app
from adaptkit.cli import common as cli_common
from adaptkit.cli.tables import Col, render_table
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, train

runner = CliRunner()
LONG = "handwritten-digits-from-the-archive"


@pytest.fixture(scope="module")
def reg(tmp_path_factory, cifar_mini):
    path = tmp_path_factory.mktemp("look") / "registry.db"
    cfg = TrainConfig(epochs=1, batch_size=8, limit_train=16, limit_eval=8)
    for task, method in ((LONG, "adapter"), ("pets", "lora"), ("pets", "linear")):
        train(f"folder:{cifar_mini}", task=task, backbone=PICO, pretrained=False, method=method, config=cfg,
              registry=Registry(path))
    return path


@pytest.fixture
def terminal(monkeypatch):
    """Make the CLI's stdout and stderr terminals, stdout 80 columns wide; yields what stdout printed."""
    buf = io.StringIO()
    monkeypatch.setattr(cli_common.err, "_force_terminal", True)
    monkeypatch.setattr(cli_common.out, "_force_terminal", True)
    monkeypatch.setattr(cli_common.out, "_color_system", None)
    monkeypatch.setattr(cli_common.out, "_file", buf)
    cli_common.out.width = 80
    yield buf
    cli_common.out.width = None


def known_numbers(reg_path) -> set[str]:
    """Every size and percentage the tables may show, formatted as they show them."""
    from adaptkit.compare import compare, format_bytes, format_percent

    report = compare(Registry(reg_path))
    out = set()
    for r in report.rows:
        out |= {format_bytes(r.bytes), format_percent(r.test_top1), format_bytes(r.full_bytes),
                f"{100 * r.share_of_backbone:.2f}%"}
    return out


@pytest.mark.parametrize("argv", [["list"], ["compare"], ["show", LONG], ["show", "pets"]])
def test_tables_fit_80_columns_and_cut_nothing(reg, terminal, argv):
    result = runner.invoke(app, [*argv, "--registry", str(reg)])
    assert result.exit_code == 0, result.output
    text = terminal.getvalue()
    assert max(len(ln) for ln in text.splitlines()) <= 80
    assert "…" not in text
    names = [argv[1]] if argv[0] == "show" else [LONG, "pets"]
    assert all(name in text for name in names)  # names are never wrapped
    table = text[text.index("┏"):text.index("┘")]
    numbers = re.findall(r"\d[\d.]*(?: KB| MB|%)", table)
    assert numbers and set(numbers) <= known_numbers(reg), (numbers, text)


def test_datasets_fit_80_columns(terminal):
    assert runner.invoke(app, ["datasets"]).exit_code == 0
    text = terminal.getvalue()
    assert max(len(ln) for ln in text.splitlines()) <= 80 and "fashion_mnist" in text and "…" not in text


def test_piped_tables_are_plain_and_whole(reg):
    result = runner.invoke(app, ["list", "--registry", str(reg)])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert not re.search("[│┃━─┏└]", result.output)
    assert lines[0].split() == ["task", "default", "versions", "method", "backbone", "trainable", "size", "test",
                                "top-1", "dataset"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert set(rows) == {LONG, "pets"} and rows["pets"][1:4] == ["v2", "2", "linear"]
    assert PICO in rows[LONG]


def test_dropped_columns_are_named_and_the_rest_fits():
    cols = [Col("name"), Col("wide", drop=1), Col("n", numeric=True)]
    rows = [["a-rather-long-task-name", "x" * 60, "123,456,789"]]
    table, hidden = render_table(Console(width=60, file=io.StringIO()), cols, rows)
    assert hidden == ["wide"] and [c.header for c in table.columns] == ["name", "n"]
    table, hidden = render_table(Console(width=200, file=io.StringIO()), cols, rows)
    assert hidden == []


def test_train_help_at_80_columns_reads_like_a_normal_cli(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    text = runner.invoke(app, ["train", "--help"], terminal_width=80).output
    assert max(len(ln) for ln in text.splitlines()) <= 80
    assert "vit_base_patch16_224.augreg_in21k" in text and "--label-smoothing X" in text
    assert not re.search(r"<\w|\{\w|list\[|…", text)
    usage = runner.invoke(app, ["predict", "--help"], terminal_width=80).output.splitlines()[0]
    assert usage == "Usage: adaptkit predict [OPTIONS] [TASK] IMAGE..."


def test_train_prints_one_plain_line_per_epoch_when_not_a_terminal(tmp_path, cifar_mini):
    result = runner.invoke(app, ["train", "-d", f"folder:{cifar_mini}", "--task", "log", "--backbone", PICO,
                                 "--no-pretrained", "--epochs", "2", "--batch-size", "8", "--limit-train", "16",
                                 "--limit-eval", "8", "--registry", str(tmp_path / "r.db")])
    assert result.exit_code == 0, result.output
    epochs = [ln for ln in result.output.splitlines() if ln.startswith("epoch ")]
    assert len(epochs) == 2
    assert re.fullmatch(r"epoch 1/2  loss \d\.\d{3}  train acc \d+\.\d%  val acc \d+\.\d%  \d+ img/s  [\d.]+ s",
                        epochs[0])
    assert re.search(r"^trained log@1: test top-1 \d+\.\d%, top-5 \d+\.\d%, best epoch \d, \d+ s$", result.output,
                     re.M)

"""Each setting declared once: the recipe's defaults, help and checks live on TrainConfig's fields, and the CLI's
options, the recipe files and the page take them from there (and the page's methods from METHODS)."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from adaptkit.cli import app
from adaptkit.cli.config_file import _API_ONLY, _MACHINE, _RECIPE_OPTIONS
from adaptkit.errors import ConfigError
from adaptkit.settings import bounds_of, check_settings, choices, default_of, floats, help_of, ints, setting
from adaptkit.training import TrainConfig


@dataclasses.dataclass
class Knobs:
    count: int = setting(3, "How many", check=ints(1, 10))
    share: float = setting(0.5, "A share", check=floats(0, 1, high_open=True))
    mode: str = setting("a", "Which mode", check=choices("a", "b"))
    note: str = setting("", "Free text")

    def __post_init__(self) -> None:
        check_settings(self)


def test_a_setting_carries_its_default_help_check_and_range():
    assert Knobs() == Knobs(3, 0.5, "a", "")
    assert default_of(Knobs, "count") == 3 and help_of(Knobs, "mode") == "Which mode"
    assert bounds_of(Knobs, "count") == (1, 10) and bounds_of(Knobs, "note") == (None, None)
    with pytest.raises(ConfigError, match=r"count must be a whole number in \[1, 10\], got 0"):
        Knobs(count=0)
    with pytest.raises(ConfigError, match=r"share must be a finite number in \[0, 1\), got 1"):
        Knobs(share=1)
    with pytest.raises(ConfigError, match="mode must be one of a, b, got 'c'"):
        Knobs(mode="c")
    with pytest.raises(ConfigError, match="count"):  # the first bad setting, in declaration order
        Knobs(count=11, mode="c")
    with pytest.raises(KeyError, match="no setting 'size'"):
        help_of(Knobs, "size")


def test_every_recipe_setting_has_help_and_checks_its_range():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help"
    for name, bad in [("epochs", 0), ("batch_size", 1.5), ("lr", "fast"), ("lr", -1.0), ("weight_decay", -1.0),
                      ("label_smoothing", 1.0), ("seed", -1), ("precision", "fp8"), ("threads", 0),
                      ("crop_scale", (0.9, 0.5)), ("device", "gpu0"), ("augment", "heavy")]:
        with pytest.raises(ConfigError):
            TrainConfig(**{name: bad})


def train_options() -> dict[str, object]:
    command = typer.main.get_command(app).commands["train"]
    return {p.name: p for p in command.params}


def test_the_train_command_takes_defaults_and_help_from_the_recipe():
    options = train_options()
    shared = [f.name for f in dataclasses.fields(TrainConfig) if f.name in options and f.name != "device"]
    assert len(shared) >= 15
    for name in shared:
        assert options[name].default == default_of(TrainConfig, name), name
        assert options[name].help == help_of(TrainConfig, name), name


def test_recipe_files_write_only_options_of_train():
    options = train_options()
    assert set(_RECIPE_OPTIONS) <= set(options)
    covered = {*_RECIPE_OPTIONS, *_API_ONLY, *_MACHINE}
    assert covered == {f.name for f in dataclasses.fields(TrainConfig)}  # a new setting is placed somewhere
    assert _API_ONLY == {n: default_of(TrainConfig, n) for n in _API_ONLY}


def test_the_page_offers_every_method_and_a_rank_where_the_method_has_one():
    from adaptkit.methods import METHODS
    from adaptkit_app.training import METHOD_CHOICES, RANKED_METHODS

    assert METHOD_CHOICES == list(METHODS)
    for name, method in METHODS.items():
        has_rank = "rank" in {f.name for f in dataclasses.fields(method.config_class)}
        assert (name in RANKED_METHODS) == has_rank

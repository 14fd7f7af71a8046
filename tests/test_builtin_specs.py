"""`builtin:NAME` and bare names of built-in sets never read a folder of the same name."""

from __future__ import annotations

import pytest

from adaptkit.data import builtin_name, load_task_data
from adaptkit.errors import DatasetError
from adaptkit.training.checks import check_train_args

CFG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
       "crop_pct": 1.0}


def test_builtin_names():
    assert builtin_name("digits") == builtin_name("builtin:digits") == "digits"
    assert builtin_name(" builtin: CIFAR10 ") == "cifar10"
    assert builtin_name("pets") is None and builtin_name("folder:digits") is None


def test_a_bare_builtin_name_beside_a_folder_of_that_name_is_the_builtin_set(tmp_path, monkeypatch):
    (tmp_path / "digits" / "a").mkdir(parents=True)
    (tmp_path / "pets").mkdir()
    monkeypatch.chdir(tmp_path)
    check_train_args("digits", None, None, object)
    check_train_args("builtin:digits", None, None, object)
    with pytest.raises(DatasetError, match="pets is a folder: write folder:pets"):
        check_train_args("pets", None, None, object)
    assert load_task_data("builtin:digits", CFG).classes == [str(i) for i in range(10)]


def test_an_unknown_builtin_name_names_the_closest(tmp_path):
    with pytest.raises(DatasetError, match="unknown data set 'digit': did you mean 'digits'"):
        load_task_data("builtin:digit", CFG)

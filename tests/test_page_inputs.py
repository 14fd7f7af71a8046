"""The page's handlers called as an attacker or a careless caller would: odd types, sizes and counts in every field.
Each is a refusal naming the page's field (or, in a batch, that request's own note), never an unexpected error and
never a job that cannot end. Over HTTP too, where a value arrives as JSON."""

from __future__ import annotations

import math
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from test_app import CIFAR_MINI, client, make_registry, registry_db  # noqa: F401  (fixtures)

from adaptkit.checks import MAX_EPOCHS
from adaptkit.errors import ConfigError
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig
from adaptkit_app import inputs
from adaptkit_app.handlers import Handlers

pytestmark = [pytest.mark.skipif(not CIFAR_MINI.is_dir(), reason=f"{CIFAR_MINI} not present"),
              pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated")]
CAT = str(CIFAR_MINI / "test" / "cat" / "0000.jpg")
TRAIN = dict(dataset="folder", folder=str(CIFAR_MINI), task="x", method="linear", epochs=1, batch_size=16, lr=None,
             rank=None, backbone="vit_pico_patch4_32", pretrained=False, limit_train=16, limit_eval=8)


@pytest.mark.parametrize("field, value, message", [
    ("epochs", math.nan, "Epochs must be a finite number"),
    ("epochs", math.inf, "Epochs must be a finite number"),
    ("epochs", 1e12, f"Epochs must be from 1 to {MAX_EPOCHS:,}"),
    ("epochs", 2.7, "Epochs must be a whole number, got 2.7"),
    ("epochs", "three", "Epochs must be a number, got 'three'"),
    ("epochs", [3], "Epochs must be a number, got [3]"),
    ("batch_size", 1e9, "Batch size must be from 1 to 65,536"),
    ("rank", 2.5, "Rank must be a whole number"),
    ("limit_eval", math.nan, "Validation and test images must be a finite number"),
    ("lr", -1, "Learning rate must be at least 0"),
    ("lr", "fast", "Learning rate must be a number"),
    ("dataset", 5, "Data set must be text, got 5"),
    ("task", 7, "Task name must be text, got 7"),
    ("task", "t" * 5000, "Task name is 5,000 characters long"),
    ("pretrained", "maybe", "Pretrained weights must be ticked or not"),
    ("method", "lasso", "Method must be one of adapter, lora"),
    ("backbone", None, "model name"),  # empty: the library's own refusal, in one line
    ("image_size", 30, '"Image size" is not a multiple of vit_pico_patch4_32\'s patch size 4: use 32'),  # the CLI's
    ("image_size", -8, '"Image size": the input size must be between 1 and 1024 px'),
    ("image_size", 1e300, '"Image size": the input size must be between 1 and 1024 px'),
    ("image_size", 2.5, "Image size must be a whole number, got 2.5"),
    ("image_size", "big", "Image size must be a number, got 'big'"),
], ids=lambda v: str(v)[:20])
def test_train_fields_are_refused_by_their_page_names(tmp_path, field, value, message):
    h = Handlers(str(tmp_path / "registry.db"), data_roots=[CIFAR_MINI.parent])
    kwargs = {**TRAIN, field: value}
    if field == "rank":
        kwargs["method"] = "lora"
    with pytest.raises(gr.Error) as info:
        h.train(**kwargs)
    assert message in info.value.message and "\n" not in info.value.message
    assert "unexpectedly" not in info.value.message
    assert not Registry(tmp_path / "registry.db").exists  # nothing started


def test_pretrained_as_text_is_read_not_taken_as_true(tmp_path):
    h = Handlers(str(tmp_path / "registry.db"), data_roots=[CIFAR_MINI.parent])
    status, _, _ = h.train(**{**TRAIN, "pretrained": "false"})
    assert "Trained **x** version 1" in status
    assert Registry(tmp_path / "registry.db").get_version("x").backbone.weights == "random"


def test_image_size_trains_at_that_size_and_the_page_says_so(tmp_path):
    h = Handlers(str(tmp_path / "registry.db"), data_roots=[CIFAR_MINI.parent])
    status, picker, _ = h.train(**{**TRAIN, "image_size": 48.0})  # a number box sends a float
    assert "Trained **x** version 1: linear on vit_pico_patch4_32@48px," in status
    assert "vit_pico_patch4_32@48px" in {value: label for label, value in picker["choices"]}["x"]
    v = Registry(tmp_path / "registry.db").get_version("x")
    assert v.backbone.data_config["input_size"] == [3, 48, 48]
    status, _, _ = h.train(**{**TRAIN, "image_size": 0})  # 0: the backbone's own, the same backbone as no size
    assert "on vit_pico_patch4_32, " in status
    assert Registry(tmp_path / "registry.db").get_version("x").backbone.data_config["input_size"] == [3, 32, 32]


def test_the_library_bounds_epochs_and_batch_for_cli_and_api_too():
    for kwargs, message in ((dict(epochs=10**12), "epochs must be a whole number in [1, 10000]"),
                            (dict(batch_size=10**9), "batch_size must be a whole number in [1, 65536]"),
                            (dict(warmup_epochs=1e30), "warmup_epochs must be a finite number in [0, 10000]")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            TrainConfig(**kwargs)


@pytest.fixture(scope="module")
def page(registry_db):  # noqa: F811
    return Handlers(str(registry_db))


def test_a_bad_field_in_a_batch_fails_only_its_own_request(page):
    images = [CAT, CAT, 5, CAT, CAT, CAT, {"path": CAT}]
    tasks = ["ada", ["ada"], "ada", "lo", "ada", "ada", "lo"]
    topks = [3, 3, 3, math.nan, "x", math.inf, 2]
    labels, notes = page.predict(images, tasks, topks)
    assert len(labels[0]) == 3 and len(labels[6]) == 2  # the good ones answered, in one pass
    for i, message in ((1, "Task must be text"), (2, "The image must be an uploaded image file"),
                       (3, "Top-k labels must be a finite number"), (4, "Top-k labels must be a number"),
                       (5, "Top-k labels must be a finite number")):
        assert labels[i] is None and message in notes[i], (i, notes[i])
    labels, notes = page.predict([CAT], ["ada"], [10**9])
    assert labels == [None] and "Top-k labels must be from 1 to 1,000" in notes[0]


def test_a_batch_of_mismatched_lists_is_one_clear_refusal(page):
    with pytest.raises(gr.Error, match="one entry per request"):
        page.predict([CAT, CAT], ["ada"], [3, 3])
    with pytest.raises(gr.Error, match="one entry per request"):
        page.predict(CAT, "ada", 3)


@pytest.mark.parametrize("value, message", [(5, "The image must be an uploaded image file"),
                                            (["a"], "The image must be an uploaded image file")])
def test_every_task_with_an_odd_image(page, value, message):
    with pytest.raises(gr.Error, match=message):
        page.predict_all(value)


@pytest.mark.parametrize("value, message", [(math.nan, "Test images per task must be a finite number"),
                                            ("abc", "Test images per task must be a number"),
                                            (-5, None), (1e300, "Test images per task must be from 1 to"),
                                            (2.5, "Test images per task must be a whole number")])
def test_continual_limit_is_checked_in_page_terms(page, value, message):
    if message is None:  # a negative count, as 0, means every image
        assert inputs.whole("Test images per task", value, 1, 10, default=None, empty_below=1) is None
        return
    with pytest.raises(gr.Error) as info:
        page.continual(value)
    assert message in info.value.message and "limit" not in info.value.message


def test_odd_values_over_http_are_refusals(client):  # noqa: F811
    labels, note = client.predict(handle_file(CAT), "ada", 3, api_name="/predict")
    assert labels["label"]  # the page is up and answers
    with pytest.raises(AppError, match="Epochs must be from 1 to 10,000"):
        client.predict("folder", str(CIFAR_MINI), "x", "linear", 1e12, 32, None, None, "vit_pico_patch4_32",
                       False, 32, 16, api_name="/train")
    with pytest.raises(AppError, match="does not download from the Hugging Face hub"):
        client.predict("hf:cifar10", "", "x", "linear", 1, 32, None, None, "vit_pico_patch4_32", False, 32, 16,
                       api_name="/train")
    with pytest.raises(AppError, match="\"Image size\" is not a multiple of vit_pico_patch4_32's patch size 4"):
        client.predict("folder", str(CIFAR_MINI), "x", "linear", 1, 32, None, None, "vit_pico_patch4_32",
                       False, 32, 16, 30, api_name="/train")
    with pytest.raises(AppError, match="Test images per task must be from 1"):
        client.predict(1e300, api_name="/continual")


def test_a_task_name_error_speaks_in_page_terms(tmp_path):
    h = Handlers(str(tmp_path / "registry.db"), data_roots=[CIFAR_MINI.parent])
    with pytest.raises(gr.Error) as info:
        h.train(**{**TRAIN, "task": "../etc"})
    assert "bad task name" in info.value.message and "--task" not in info.value.message
    assert not Path(tmp_path / "registry.db").exists()

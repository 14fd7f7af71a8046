"""The public Python API checks its arguments and raises adaptkit errors; training that diverges saves nothing."""

from __future__ import annotations

import logging
import os
import signal

import numpy as np
import pytest
import torch
from conftest import PICO
from PIL import Image

from adaptkit import Predictor, TrainConfig, train
from adaptkit.data import load_task_data, open_image
from adaptkit.errors import AdaptkitError, ConfigError, DatasetError, DivergedError, ImageError
from adaptkit.methods import get_method

CONFIG_CASES = [
    ({"epochs": 1.5}, "epochs must be a whole number in [1, 10000], got 1.5"),
    ({"epochs": True}, "epochs must be a whole number"),
    ({"batch_size": 2.5}, "batch_size must be a whole number in [1, 65536], got 2.5"),
    ({"lr": float("inf")}, "lr must be a finite number greater than 0"),
    ({"lr": "fast"}, "lr must be a number greater than 0, 'auto' or None"),
    ({"seed": -1}, "seed must be a whole number in [0, 4294967295]"),
    ({"grad_clip": 0.0}, "grad_clip must be a finite number greater than 0"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio must be a finite number in [0, 1]"),
    ({"val_fraction": float("nan")}, "val_fraction must be a finite number in [0, 1)"),
    ({"crop_scale": (0.9, 0.1)}, "crop_scale[0] must be a finite number in (0, 0.1]"),
    ({"crop_scale": 0.5}, "crop_scale must be a pair (low, high)"),
    ({"device": "bogus"}, "unknown device 'bogus'"),
    ({"device": 3}, "device must be a name such as cpu or cuda, got 3"),
]


@pytest.mark.parametrize(("values", "message"), CONFIG_CASES, ids=[str(v) for v, _ in CONFIG_CASES])
def test_train_config_refuses_bad_values(values, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**values)
    assert message in str(info.value)


METHOD_CASES = [
    ("adapter", {"scale": float("nan")}, "adapter scale must be a finite number or None, got nan"),
    ("adapter", {"rank": 2.0}, "adapter rank must be a whole number in [1, 4096], got 2.0"),
    ("adapter", {"dropout": "x"}, "adapter dropout must be a finite number in [0, 1)"),
    ("lora", {"alpha": float("inf")}, "lora alpha must be a finite number, got inf"),
    ("lora", {"rank": 10**6}, "lora rank must be a whole number in [1, 4096]"),
    ("adapter", [("rank", 8)], "method settings must be a dict"),
    ("adaptor", None, "unknown method 'adaptor': did you mean 'adapter'?"),
    (None, None, "unknown method None"),
]


@pytest.mark.parametrize(("name", "config", "message"), METHOD_CASES, ids=[m for _, _, m in METHOD_CASES])
def test_method_settings_refuse_bad_values(name, config, message):
    with pytest.raises(ConfigError) as info:
        get_method(name, config)
    assert message in str(info.value)


def test_method_names_are_case_insensitive_and_targets_may_be_a_string():
    assert get_method(" LoRA ", {"targets": "qkv,fc1"}).config.targets == ("qkv", "fc1")
    assert get_method("Adapter").name == "adapter"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dataset": None}, "dataset must be a spec"),
    ({"dataset": "digits", "backbone": 123}, "backbone must be a timm model name"),
    ({"dataset": "digits", "task": 7}, "task must be a name"),
    ({"dataset": "digits", "config": {"epochs": 1}}, "config must be a TrainConfig, got dict"),
    ({"dataset": "digits", "pretrained": "false"}, "pretrained must be True or False, got 'false'"),
    ({"dataset": "digits", "classes": 3}, "classes must be a string such as '0-4' or 'cat,dog'"),
    ({"dataset": "digits", "classes": [0, 1]}, "classes must be a string such as '0-4' or 'cat,dog'"),
    ({"dataset": "digits", "init_from": 5}, "init_from must be TASK, TASK@N or 'auto', got 5"),
    ({"dataset": "digits", "method": "lora", "config": TrainConfig(device="cuda:7")}, "cuda:7"),
])
def test_train_refuses_bad_arguments_before_anything_slow(tmp_path, kwargs, message):
    if "cuda:7" in message and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(AdaptkitError) as info:
        train(registry=tmp_path / "r.db", **kwargs)
    assert message in str(info.value)
    assert not (tmp_path / "adapters").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_mini):
    reg = tmp_path_factory.mktemp("api") / "registry.db"
    cfg = TrainConfig(epochs=1, batch_size=8, limit_train=16, limit_eval=8)
    train(f"folder:{cifar_mini}", task="pets", backbone=PICO, pretrained=False, config=cfg, registry=reg)
    return reg


def test_numpy_images_predict_like_pil_images(trained):
    predictor = Predictor(trained, device="cpu")
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    from_pil = predictor.predict([Image.fromarray(rgb)], "pets", topk=3)
    assert predictor.predict([rgb], "pets", topk=3) == from_pil
    assert predictor.predict(rgb, "pets", topk=3) == from_pil  # one image needs no list
    assert predictor.predict([rgb.transpose(2, 0, 1)], "pets", topk=3) == from_pil  # channels first
    assert predictor.predict([rgb / 255.0], "pets", topk=3) == from_pil  # floats in [0, 1]


@pytest.mark.parametrize(("image", "message"), [
    (None, "an image must be"),
    (torch.zeros(3, 8, 8), "a tensor image must have shape (3, 32, 32)"),
    (torch.zeros(3, 32, 32, dtype=torch.uint8), "a tensor image must be float"),
    (torch.full((3, 32, 32), float("nan")), "NaN or infinite"),
    (np.zeros((5, 5, 2), dtype=np.uint8), "a numpy image must have shape"),
    (np.array([["a"]]), "a numpy image must hold numbers"),
    (3.5, "an image must be"),
])
def test_bad_images_raise_image_errors(trained, image, message):
    with pytest.raises(ImageError) as info:
        Predictor(trained, device="cpu").predict([image], "pets")
    assert message in str(info.value)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device": "bogus"}, "unknown device 'bogus'"),
    ({"device": "cuda:99"}, "cuda:99"),
    ({"max_backbones": 0}, "max_backbones must be a whole number at least 1"),
])
def test_predictor_refuses_bad_arguments(trained, kwargs, message):
    with pytest.raises(ConfigError) as info:
        Predictor(trained, **kwargs)
    assert message in str(info.value)


def test_predict_refuses_bad_task_and_topk(trained):
    predictor = Predictor(trained, device="cpu")
    with pytest.raises(ConfigError, match="a task must be named by a string"):
        predictor.predict([np.zeros((8, 8), np.uint8)], 3)
    with pytest.raises(ConfigError, match="topk must be a whole number at least 1"):
        predictor.predict([np.zeros((8, 8), np.uint8)], "pets", topk=0)
    image = np.zeros((8, 8), np.uint8)
    for call in (lambda k: predictor.predict_auto([image], topk=k),
                 lambda k: predictor.predict_mixed([image], ["pets"], topk=k)):
        for bad in (float("nan"), 2.5, "3", True, 0):
            with pytest.raises(ConfigError, match="topk must be a whole number at least 1"):
                call(bad)


def test_a_named_pipe_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    def hung(*_: object) -> None:
        raise TimeoutError("open_image blocked on a named pipe")

    old = signal.signal(signal.SIGALRM, hung)  # a read of the pipe would block forever: fail, don't hang
    signal.alarm(10)
    try:
        with pytest.raises(ImageError, match="is not a regular file"):
            open_image(fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_decompression_bomb_is_one_error_and_no_warning(tmp_path, recwarn):
    path = tmp_path / "big.png"
    Image.new("L", (1, 1)).save(path)
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 100
    try:
        Image.new("L", (15, 10)).save(path)  # 150 px: between the limit and twice it, where PIL only warns
        with pytest.raises(ImageError, match="too large to decode safely"):
            open_image(path)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_one_class_is_refused(tmp_path):
    for i in range(3):
        (tmp_path / "only").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "only" / f"{i}.png")
    with pytest.raises(DatasetError, match="has one class \\(only\\): a classifier needs two or more"):
        load_task_data(f"folder:{tmp_path}", {"input_size": (3, 32, 32)})


def test_divergence_stops_training_and_saves_nothing(tmp_path, cifar_mini):
    cfg = TrainConfig(epochs=2, batch_size=16, limit_train=32, limit_eval=8, lr=1e8)
    with pytest.raises(DivergedError, match="training diverged at epoch 1, step 2: the loss ran away"):
        train(f"folder:{cifar_mini}", task="boom", backbone=PICO, pretrained=False, config=cfg,
              registry=tmp_path / "r.db")
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").rglob("*.safetensors"))
    from adaptkit.registry import Registry

    assert Registry(tmp_path / "r.db").tasks() == []


def test_nan_parameters_stop_training(tmp_path, cifar_mini, monkeypatch):
    from adaptkit.methods.adapter import AdapterConfig

    cfg = TrainConfig(epochs=1, batch_size=16, limit_train=16, limit_eval=8)
    monkeypatch.setattr(AdapterConfig, "__post_init__", lambda self: None)  # let a NaN scale through the check
    with pytest.raises(DivergedError, match="the loss is nan"):
        train(f"folder:{cifar_mini}", task="nan", backbone=PICO, pretrained=False, config=cfg,
              method_config={"scale": float("nan"), "rank": 4}, registry=tmp_path / "r.db")


def test_batch_larger_than_the_data_is_capped_with_a_warning(tmp_path, cifar_mini, caplog):
    cfg = TrainConfig(epochs=1, batch_size=4096, limit_train=16, limit_eval=8)
    with caplog.at_level(logging.WARNING, logger="adaptkit"):
        result = train(f"folder:{cifar_mini}", task="cap", backbone=PICO, pretrained=False, config=cfg,
                       registry=tmp_path / "r.db")
    assert "batch size 4096 is larger than the 16 training images: using batch size 16" in caplog.text
    assert result.version.train["recipe"]["batch_size"] == 16


def test_a_failed_download_leaves_no_folder(tmp_path, monkeypatch):
    import socket

    def no_network(*_: object, **__: object) -> None:
        raise socket.gaierror("no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # the download fails at once, and never happens
    with pytest.raises(DatasetError, match="the download failed"):
        load_task_data("cifar10", {"input_size": (3, 32, 32)}, data_dir=tmp_path / "data" / "sets", download=True)
    assert list(tmp_path.iterdir()) == []


def test_backbone_compare_and_registry_check_their_arguments(tmp_path):
    from adaptkit import compare, create_backbone
    from adaptkit.registry import Registry

    with pytest.raises(ConfigError, match="unknown device 'bogus'"):
        create_backbone(PICO, pretrained=False, device="bogus")
    with pytest.raises(ConfigError, match="a version is named by a string"):
        Registry(tmp_path / "r.db").get_version(3)
    assert compare(str(tmp_path / "r.db")).tasks == 0  # a path works as well as a Registry


def test_a_registry_named_by_a_number_is_refused():
    from adaptkit.errors import RegistryError
    from adaptkit.registry import Registry

    with pytest.raises(RegistryError, match="a registry is a path or a URL, got 5"):
        Registry(5)

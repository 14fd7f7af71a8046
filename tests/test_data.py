"""Data loading: specs, splits, transforms, image modes and the errors a user sees."""
import pickle
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaptkit.data import (
    DatasetInfo,
    TaskData,
    build_transform,
    default_data_dir,
    list_datasets,
    load_task_data,
    to_rgb,
)
from adaptkit.errors import DatasetError

MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
       "crop_pct": 1.0, "crop_mode": "center"}

needs_mini = pytest.mark.skipif(not MINI.is_dir(), reason=f"{MINI} not present")


def _indices(data: TaskData, split: str) -> list[int]:
    return getattr(data, split).indices


def _copy_mini(dst: Path, classes: list[str], per_class: int, split: str = "train") -> Path:
    for c in classes:
        (dst / c).mkdir(parents=True)
        for p in sorted((MINI / split / c).glob("*.jpg"))[:per_class]:
            shutil.copy(p, dst / c / p.name)
    return dst


@needs_mini
def test_folder_train_test_layout():
    data = load_task_data(f"folder:{MINI}", CFG, val_fraction=0.1, seed=0)
    assert data.classes == CIFAR_CLASSES and data.num_classes == 10
    assert (len(data.train), len(data.val), len(data.test)) == (450, 50, 200)
    for split in (data.train, data.val, data.test):
        x, y = split[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert data.test[0][1] == 0 and data.test[len(data.test) - 1][1] == 9


@needs_mini
def test_val_split_is_seeded_disjoint_and_uses_eval_transform():
    a = load_task_data(f"folder:{MINI}", CFG, seed=0)
    b = load_task_data(f"folder:{MINI}", CFG, seed=0)
    c = load_task_data(f"folder:{MINI}", CFG, seed=1)
    assert _indices(a, "val") == _indices(b, "val")
    assert _indices(a, "val") != _indices(c, "val")
    assert not set(_indices(a, "val")) & set(_indices(a, "train"))
    assert len(set(_indices(a, "val")) | set(_indices(a, "train"))) == 500
    # eval transform is deterministic; the augmented train transform is not
    assert torch.equal(a.val[0][0], a.val[0][0])
    assert a.val.transform is not a.train.transform
    assert "RandomResizedCrop" in repr(a.train.transform) and "RandomResizedCrop" not in repr(a.val.transform)
    plain = load_task_data(f"folder:{MINI}", CFG, augment=False)
    assert torch.equal(plain.train[0][0], plain.train[0][0])


@needs_mini
def test_limits_keep_seeded_subsets():
    data = load_task_data(f"folder:{MINI}", CFG, limit_train=7, limit_eval=5, seed=3)
    assert (len(data.train), len(data.val), len(data.test)) == (7, 5, 5)
    again = load_task_data(f"folder:{MINI}", CFG, limit_train=7, limit_eval=5, seed=3)
    assert _indices(data, "train") == _indices(again, "train")
    assert _indices(data, "test") == _indices(again, "test")
    with pytest.raises(DatasetError, match="limit_train"):
        load_task_data(f"folder:{MINI}", CFG, limit_train=0)


def test_digits_is_offline_and_complete():
    data = load_task_data("digits", CFG, val_fraction=0.1)
    assert data.classes == [str(i) for i in range(10)]
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert len(data.test) == pytest.approx(0.2 * 1797, abs=10)
    assert set(data.test.source.labels[data.test.indices].tolist()) == set(range(10))  # stratified
    x, _ = data.test[0]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1


@needs_mini
def test_single_tree_folder_splits_deterministically(tmp_path):
    root = _copy_mini(tmp_path / "tree", ["cat", "dog", "ship"], per_class=10)
    a = load_task_data(f"folder:{root}", CFG, val_fraction=0.0)
    b = load_task_data(f"folder:{root}", CFG, val_fraction=0.0, seed=5)
    assert a.classes == ["cat", "dog", "ship"]
    assert (len(a.train), len(a.val), len(a.test)) == (24, 0, 6)
    assert _indices(a, "test") == _indices(b, "test")  # the test split does not depend on the seed
    assert not set(_indices(a, "test")) & set(_indices(a, "train"))
    assert sorted(a.test[i][1] for i in range(6)) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_image_mode_loads_as_rgb(tmp_path, mode):
    ramp = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))  # (16, 32)
    img = Image.fromarray(ramp, "L").convert("RGB").convert(mode) if mode not in ("I;16", "I", "F") else None
    if mode == "I;16":
        img = Image.fromarray(ramp.astype(np.uint16) * 257)
        assert img.mode == "I;16"
    elif mode in ("I", "F"):
        img = Image.fromarray(ramp.astype(np.int32) * 257).convert(mode)
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == img.size
    if mode in ("L", "I;16", "I", "F"):  # 16-bit is scaled, not clipped: the ramp survives
        assert np.abs(np.asarray(rgb)[..., 0].astype(int) - ramp).max() <= 1
    for c in ("a", "b"):  # and it goes through a folder data set
        (tmp_path / c).mkdir(exist_ok=True)
        for i in range(3):
            img.save(tmp_path / c / f"{i}.tiff") if mode in ("I;16", "I", "F", "CMYK") else \
                img.save(tmp_path / c / f"{i}.png")
    data = load_task_data(f"folder:{tmp_path}", CFG, val_fraction=0.0)
    assert data.train[0][0].shape == (3, 32, 32)


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(img)).min() == 255


def test_build_transform_sizes():
    img = Image.new("L", (50, 70), 128)
    for train in (True, False):
        assert build_transform(CFG, train=train)(img).shape == (3, 32, 32)


def test_list_datasets_and_default_dir(monkeypatch, tmp_path):
    rows = {r.name: r for r in list_datasets()}
    assert all(isinstance(r, DatasetInfo) for r in rows.values())
    assert rows["cifar100"].num_classes == 100 and rows["cifar100"].kind == "torchvision"
    assert rows["folder"].kind == "folder" and rows["digits"].kind == "bundled"
    monkeypatch.setenv("ADAPTKIT_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("ADAPTKIT_DATA_DIR")
    assert default_data_dir() == Path.home() / ".cache" / "adaptkit" / "data"


def _make_bad(tmp_path: Path, case: str) -> str:
    if case == "missing":
        return str(tmp_path / "nope")
    if case == "empty":
        return str(tmp_path)
    if case == "no_images":
        (tmp_path / "cat").mkdir()
        (tmp_path / "cat" / "notes.txt").write_text("x")
        Image.new("RGB", (8, 8)).save(tmp_path / "dog.png")
        (tmp_path / "dog").mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "0.png")
        return str(tmp_path)
    for split, classes in (("train", ["cat", "dog"]), ("test", ["cat", "emu"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "0.png")
    return str(tmp_path)


@pytest.mark.parametrize(("case", "match"), [
    ("missing", r"does not exist.*nope"),
    ("empty", r"no class folders.*<class name>"),
    ("no_images", r"\['cat'\].*no images"),
    ("mismatch", r"only in train: \['dog'\], only in test: \['emu'\]"),
])
def test_bad_folders_raise_actionable_errors(tmp_path, case, match):
    path = _make_bad(tmp_path, case)
    with pytest.raises(DatasetError, match=match):
        load_task_data(f"folder:{path}", CFG)


def test_corrupt_image_names_the_file(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            (tmp_path / c / f"{i}.jpg").write_bytes(b"not a jpeg")
    data = load_task_data(f"folder:{tmp_path}", CFG, val_fraction=0.0)
    with pytest.raises(DatasetError, match=r"cannot read image .*\.jpg"):
        data.train[0]


def test_unknown_spec_and_bad_fraction():
    with pytest.raises(DatasetError, match=r"unknown data set 'imagenet9'.*cifar100.*digits.*folder:PATH"):
        load_task_data("imagenet9", CFG)
    for bad in (-0.1, 1.0):
        with pytest.raises(DatasetError, match="val_fraction"):
            load_task_data("digits", CFG, val_fraction=bad)


@pytest.mark.parametrize("download", [False, True])
def test_torchvision_set_missing_offline(tmp_path, monkeypatch, download):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)  # never download 170 MB, even with a network
    start = time.monotonic()
    with pytest.raises(DatasetError) as info:
        load_task_data("cifar10", CFG, data_dir=tmp_path, download=download)
    msg = str(info.value)
    assert "'cifar10'" in msg and str(tmp_path / "cifar10") in msg and "folder:PATH" in msg
    assert info.value.__cause__ is not None
    assert time.monotonic() - start < 60


@needs_mini
@pytest.mark.parametrize("layout", ["train_only", "train_val"])
def test_train_folder_without_test_or_with_val(tmp_path, layout):
    _copy_mini(tmp_path / "train", ["cat", "dog"], per_class=10)
    if layout == "train_val":
        _copy_mini(tmp_path / "val", ["cat", "dog"], per_class=3, split="test")
    data = load_task_data(f"folder:{tmp_path}", CFG, val_fraction=0.0)
    assert data.classes == ["cat", "dog"]  # never a class called "train"
    assert (len(data.train), len(data.test)) == ((16, 4) if layout == "train_only" else (20, 6))


@needs_mini
def test_splits_pickle_for_dataloader_workers():
    data = load_task_data(f"folder:{MINI}", CFG, limit_train=4, limit_eval=4)
    clone = pickle.loads(pickle.dumps(data.val))
    assert torch.equal(clone[0][0], data.val[0][0])
    batch = next(iter(torch.utils.data.DataLoader(data.train, batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 32)

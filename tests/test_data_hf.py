"""Hugging Face data sets as sources (hf-disk:, hf-files:, hf:), built here from real cifar10-mini images."""
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaptkit.data import HFImages, load_task_data
from adaptkit.errors import DatasetError

datasets = pytest.importorskip("datasets")

MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini"
CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
       "crop_pct": 1.0, "crop_mode": "center"}
CLASSES = ["cat", "dog", "ship"]
ALTERNATIVES = ("hf-disk:PATH", "hf-files:PATH", "folder:PATH")
pytestmark = pytest.mark.skipif(not MINI.is_dir(), reason=f"{MINI} not present")


def _files(split: str, start: int, stop: int, classes=CLASSES) -> tuple[list[str], list[int]]:
    """Paths of images start:stop of each class of a cifar10-mini split, and their labels (index in classes)."""
    pairs = [(str(p), i) for i, c in enumerate(classes) for p in sorted((MINI / split / c).glob("*.jpg"))[start:stop]]
    return [p for p, _ in pairs], [y for _, y in pairs]


def _pixels(img) -> bytes:
    return np.asarray(img.convert("RGB")).tobytes()


def _labelled(split: str, start: int, stop: int) -> "datasets.Dataset":
    paths, labels = _files(split, start, stop)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({"img": paths, "label": labels}, features=features)


def _refused(match: str, *args, **kwargs) -> str:
    """The one-line DatasetError message load_task_data(*args, **kwargs) raises."""
    with pytest.raises(DatasetError, match=match) as info:
        load_task_data(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def saved_dict(tmp_path_factory) -> Path:
    """train (8 a class), validation (3 a class) and test (4 a class) with Image + ClassLabel, saved to disk."""
    path = tmp_path_factory.mktemp("hf") / "saved"
    datasets.DatasetDict(train=_labelled("train", 0, 8), validation=_labelled("test", 0, 3),
                         test=_labelled("test", 3, 7)).save_to_disk(str(path))
    return path


def test_save_to_disk_dict_uses_its_own_validation_split(saved_dict):
    data = load_task_data(f"hf-disk:{saved_dict}", CFG, val_fraction=0.5, seed=1)  # val_fraction has no say
    assert data.classes == CLASSES
    assert (len(data.train), len(data.val), len(data.test)) == (24, 9, 12)
    assert all(i >= 24 for i in data.val.indices) and all(i < 24 for i in data.train.indices)  # rows after train
    val_paths, val_labels = _files("test", 0, 3)
    expected = {_pixels(Image.open(p)): y for p, y in zip(val_paths, val_labels, strict=True)}
    seen = {}
    for i in data.val.indices:
        img, label = data.val.source[i]
        assert isinstance(img, Image.Image) and img.mode == "RGB" and isinstance(label, int)
        seen[_pixels(img)] = label
    assert seen == expected  # exactly the validation rows, each with its own label
    assert isinstance(data.test.source, HFImages) and sorted(data.test.source.targets) == [0] * 4 + [1] * 4 + [2] * 4
    test_paths, _ = _files("test", 3, 7)
    assert _pixels(data.test.source[5][0]) == _pixels(Image.open(test_paths[5]))
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 3
    clone = pickle.loads(pickle.dumps(data.val))  # DataLoader workers
    assert torch.equal(clone[0][0], data.val[0][0])


def test_class_selection_keeps_the_validation_split(saved_dict):
    data = load_task_data(f"hf-disk:{saved_dict}", CFG, classes="cat,ship", limit_eval=5)
    assert data.classes == ["cat", "ship"]
    assert (len(data.train), len(data.val), len(data.test)) == (16, 5, 5)
    assert all(i >= 24 for i in data.val.indices) and {data.val[i][1] for i in range(5)} <= {0, 1}


def test_parquet_folder_and_single_file(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    _labelled("train", 0, 10).to_parquet(str(folder / "train.parquet"))
    _labelled("test", 0, 5).to_parquet(str(folder / "test.parquet"))
    data = load_task_data(f"hf-files:{folder}", CFG, val_fraction=0.1)
    assert data.classes == CLASSES
    assert (len(data.train), len(data.val), len(data.test)) == (27, 3, 15)  # no validation split: val carved
    assert not set(data.val.indices) & set(data.train.indices)
    paths, labels = _files("test", 0, 5)
    img, label = data.test.source[7]
    assert _pixels(img) == _pixels(Image.open(paths[7])) and label == labels[7]
    one = load_task_data(f"hf-files:{folder / 'train.parquet'}", CFG, val_fraction=0.0)
    again = load_task_data(f"hf-files:{folder / 'train.parquet'}", CFG, val_fraction=0.0, seed=4)
    assert (len(one.train), len(one.test)) == (24, 6)  # a stratified 20% test split, as for the other sources
    assert sorted(one.test.source.targets[i] for i in one.test.indices) == [0, 0, 1, 1, 2, 2]
    assert one.test.indices == again.test.indices and not set(one.test.indices) & set(one.train.indices)


def test_imagefolder_tree(tmp_path):
    root = tmp_path / "tree"
    for split, n in (("train", 6), ("test", 2)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for p in sorted((MINI / split / c).glob("*.jpg"))[:n]:
                shutil.copy(p, root / split / c / p.name)
    data = load_task_data(f"hf-files:{root}", CFG, val_fraction=0.25)
    assert data.classes == ["cat", "dog"]
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 4)
    by_pixels = {_pixels(Image.open(p)): c for c in ("cat", "dog") for p in (root / "test" / c).glob("*.jpg")}
    for i in range(4):
        img, label = data.test.source[i]
        assert by_pixels[_pixels(img)] == data.classes[label]


def test_unlabelled_test_split_is_replaced_by_a_carved_one(tmp_path):
    unlabelled = _labelled("test", 0, 2).map(lambda r: {"label": -1})  # as on the hub: a test split without labels
    datasets.DatasetDict(train=_labelled("train", 0, 5), test=unlabelled).save_to_disk(str(tmp_path / "s"))
    data = load_task_data(f"hf-disk:{tmp_path / 's'}", CFG, val_fraction=0.0)
    assert (len(data.train), len(data.test)) == (12, 3) and data.test.source is data.train.source


@pytest.fixture
def odd_columns(tmp_path) -> Path:
    """One Dataset (no splits): two image columns, string and int label columns, no ClassLabel."""
    paths, labels = _files("train", 0, 5)
    names = ["dog", "cat", "ship"]  # not in sorted order: classes must come out sorted
    features = datasets.Features({"Photo (full)": datasets.Image(), "thumb": datasets.Image(),
                                  "kind": datasets.Value("string"), "code": datasets.Value("int32")})
    table = datasets.Dataset.from_dict({"Photo (full)": paths, "thumb": paths[::-1],
                                        "kind": [names[y] for y in labels], "code": [(10, 2, 7)[y] for y in labels]},
                                       features=features)
    table.save_to_disk(str(tmp_path / "odd"))
    return tmp_path / "odd"


def test_string_labels_and_named_columns(odd_columns):
    spec = f"hf-disk:{odd_columns}"
    msg = _refused("several image columns", spec, CFG)
    assert "Photo (full), thumb" in msg and "image_column" in msg and "--" not in msg
    msg = _refused("several int or string label columns", spec, CFG, image_column="Photo (full)")
    assert "kind, code" in msg and "label_column" in msg
    msg = _refused("no column 'photo'", spec, CFG, image_column="photo", label_column="kind")
    assert "Photo (full) (Image), thumb (Image), kind (Value), code (Value)" in msg
    data = load_task_data(spec, CFG, image_column="Photo (full)", label_column="kind", val_fraction=0.0)
    assert data.classes == ["cat", "dog", "ship"]
    assert (len(data.train), len(data.val), len(data.test)) == (12, 0, 3)
    paths, labels = _files("train", 0, 5)
    for i in range(0, 15, 4):
        img, label = data.train.source[i]
        assert _pixels(img) == _pixels(Image.open(paths[i]))
        assert data.classes[label] == ["dog", "cat", "ship"][labels[i]]
    coded = load_task_data(spec, CFG, image_column="thumb", label_column="code")
    assert coded.classes == ["2", "7", "10"]  # ints sorted as numbers


def test_offline_hub_fails_fast_and_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    msg = _refused("offline", "hf:adaptkit-tests/no-such-set", CFG)
    assert time.monotonic() - start < 5
    assert all(a in msg for a in ALTERNATIVES) and "hf:adaptkit-tests/no-such-set" in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("no network in tests")

    monkeypatch.setattr("socket.create_connection", unreachable)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    was = datasets.config.HF_HUB_OFFLINE
    start = time.monotonic()
    msg = _refused("the hub cannot be reached", "hf:adaptkit-tests/no-such-set:config", CFG)
    assert time.monotonic() - start < 5 and all(a in msg for a in ALTERNATIVES)
    assert datasets.config.HF_HUB_OFFLINE == was  # offline mode only for the call


def test_refusals_are_one_line_and_say_what_to_do(tmp_path, saved_dict, monkeypatch):
    _refused("hf-disk: path is not a folder", f"hf-disk:{tmp_path / 'nope'}", CFG)
    (tmp_path / "empty").mkdir()
    _refused("is not a save_to_disk folder", f"hf-disk:{tmp_path / 'empty'}", CFG)
    _refused("found no parquet files or images", f"hf-files:{tmp_path / 'empty'}", CFG)
    _refused("needs a data set name", "hf:", CFG)
    _refused("image_column and label_column apply to hf", "digits", CFG, label_column="label")
    no_train = tmp_path / "no-train"
    datasets.DatasetDict(validation=_labelled("test", 0, 2), test=_labelled("test", 2, 4)).save_to_disk(str(no_train))
    _refused(r"no train split \(its splits: validation, test\)", f"hf-disk:{no_train}", CFG)
    _refused("no column 'label_id'.*img \\(Image\\), label \\(ClassLabel\\)", f"hf-disk:{saved_dict}", CFG,
             label_column="label_id")
    assert "hf-disk:" in _refused("save_to_disk folder: write hf-disk:", str(saved_dict), CFG)
    assert "hf:NAME[:CONFIG]" in _refused("unknown data set 'imagenet9'", "imagenet9", CFG)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    broken = datasets.Dataset.from_dict({"img": [{"bytes": b"not an image", "path": None}] * 4, "label": [0, 1] * 2},
                                        features=features)
    broken.save_to_disk(str(tmp_path / "broken"))
    data = load_task_data(f"hf-disk:{tmp_path / 'broken'}", CFG, val_fraction=0.0)
    with pytest.raises(DatasetError, match=r"cannot read the image in row \d of the train split .*fix or drop"):
        data.train[0]
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the hf extra were not installed
    _refused(r"need the hf extra: pip install 'adaptkit\[hf\]'", f"hf-disk:{saved_dict}", CFG)


def test_cli_trains_on_named_columns_and_the_recipe_keeps_them(odd_columns, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from adaptkit.cli import app
    from adaptkit.registry import Registry

    runner, reg = CliRunner(), tmp_path / "r.db"
    base = ["train", "-d", f"hf-disk:{odd_columns}", "--task", "odd", "--backbone", "vit_pico_patch4_32",
            "--no-pretrained", "--method", "linear", "--epochs", "1", "--threads", "1", "--registry", str(reg)]
    refused = runner.invoke(app, base)
    assert refused.exit_code == 1 and "--image-column" in " ".join(refused.output.split())
    done = runner.invoke(app, [*base, "--image-column", "Photo (full)", "--label-column", "kind"])
    assert done.exit_code == 0, done.output
    version = Registry(reg).get_version("odd")
    assert version.task.classes == ["cat", "dog", "ship"]
    assert (version.train["image_column"], version.train["label_column"]) == ("Photo (full)", "kind")
    recipe = yaml.safe_load(runner.invoke(app, ["show", "odd", "--recipe", "--registry", str(reg)]).stdout)
    assert (recipe["image-column"], recipe["label-column"]) == ("Photo (full)", "kind")


def test_the_page_reads_hf_sets_only_inside_its_data_roots(saved_dict, tmp_path):
    import gradio as gr

    from adaptkit.errors import DatasetError
    from adaptkit_app.handlers import Handlers
    from adaptkit_app.training import dataset_choices, dataset_spec

    root = saved_dict.parent
    h = Handlers(str(tmp_path / "registry.db"), data_roots=[root])
    assert dataset_spec(f"hf-disk:{saved_dict.name}", "", h.data_roots) == f"hf-disk:{saved_dict}"
    assert dataset_spec(f"HF-Disk: {saved_dict}", "", h.data_roots) == f"hf-disk:{saved_dict}"
    with pytest.raises(DatasetError, match="outside the data roots"):
        dataset_spec("hf-files:/etc", "", h.data_roots)
    for spec, message in (("hf:cifar10", "does not download from the Hugging Face hub"),
                          ("hf-disk:", "Enter the path after hf-disk:"),
                          ("s3://bucket/x", "is not a data set adaptkit knows")):
        with pytest.raises(gr.Error, match=message):
            dataset_spec(spec, "", h.data_roots)
    assert [name for _, name in dataset_choices() if name.startswith("hf")] == []


def test_a_classlabel_value_beyond_its_names_is_one_line(tmp_path):
    import pyarrow as pa

    paths, labels = _files("train", 0, 2)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    table = datasets.Dataset.from_dict({"img": paths, "label": labels}, features=features).data.table
    table = table.set_column(1, "label", pa.array(labels[:-1] + [len(CLASSES) + 4], pa.int64()))
    datasets.Dataset(table, info=datasets.DatasetInfo(features=features)).save_to_disk(str(tmp_path / "bad"))
    _refused(rf"row {len(labels) - 1} of hf-disk:.* has label {len(CLASSES) + 4} in column 'label', whose ClassLabel "
             rf"has {len(CLASSES)} names", f"hf-disk:{tmp_path / 'bad'}", CFG)


def test_the_first_load_prints_no_progress_bar_into_piped_output(tmp_path):
    import subprocess

    files = tmp_path / "files"
    files.mkdir()
    _labelled("train", 0, 4).to_parquet(str(files / "train.parquet"))
    code = ("import datasets; datasets.config.HF_DATASETS_CACHE = sys.argv[2]\n"
            "from adaptkit.data.hf import load_hf; load_hf('hf-files:' + sys.argv[1])\n"
            "assert not datasets.are_progress_bars_disabled()  # the caller's setting is restored")
    run = subprocess.run([sys.executable, "-c", "import sys\n" + code, str(files), str(tmp_path / "cache")],
                         capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert "Generating train split" not in run.stderr and "\r" not in run.stderr, run.stderr

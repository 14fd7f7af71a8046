"""The web app: served on localhost and called through gradio_client, and its handlers called directly."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from ports import free_port

from adaptkit.data import open_image
from adaptkit.errors import DatasetError, ImageError
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, train
from adaptkit_app.handlers import AUTO, Handlers
from adaptkit_app.main import launch
from adaptkit_app.training import dataset_spec

CIFAR_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini"
CLASSES = sorted(p.name for p in (CIFAR_MINI / "test").iterdir()) if CIFAR_MINI.is_dir() else []
TASKS = {"ada": "adapter", "lo": "lora"}

pytestmark = [
    pytest.mark.skipif(not CIFAR_MINI.is_dir(), reason=f"{CIFAR_MINI} not present"),
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated"),  # gradio's
]


def make_registry(folder: Path, tasks: dict[str, str] = TASKS) -> Path:
    """A registry with one tiny task per (name, method), trained in a few seconds on the CPU."""
    db = folder / "registry.db"
    reg = Registry(db)
    for name, method in tasks.items():
        train(f"folder:{CIFAR_MINI}", task=name, backbone="vit_pico_patch4_32", pretrained=False, method=method,
              config=TrainConfig(epochs=1, batch_size=32, limit_train=64, limit_eval=32), registry=reg)
    return db


@pytest.fixture(scope="module")
def registry_db(tmp_path_factory) -> Path:
    return make_registry(tmp_path_factory.mktemp("app-registry"))


@pytest.fixture(scope="module")
def client(registry_db):
    app = launch(str(registry_db), port=free_port(), prevent_thread_lock=True, quiet=True,
                 data_roots=[CIFAR_MINI.parent])
    try:
        yield Client(app.local_url, verbose=False)
    finally:
        app.close()


@pytest.fixture(scope="module")
def cat() -> str:
    return str(CIFAR_MINI / "test" / "cat" / "0000.jpg")


def test_tasks_lists_every_task_with_method_backbone_and_accuracy(client):
    picker, note = client.predict(None, api_name="/tasks")
    labels = dict((value, label) for label, value in picker["choices"])
    assert set(TASKS) <= set(labels)
    for name, method in TASKS.items():
        assert method in labels[name] and "vit_pico_patch4_32" in labels[name] and "test" in labels[name]
    assert note["visible"] is False


def test_predict_same_image_on_two_tasks(client, cat):
    for name in TASKS:
        labels, timing = client.predict(handle_file(cat), name, 10, api_name="/predict")
        assert labels["label"] in CLASSES
        probs = [c["confidence"] for c in labels["confidences"]]
        assert len(probs) == 10 and all(0 <= p <= 1 for p in probs)
        assert sum(probs) == pytest.approx(1.0, abs=1e-3)
        assert "ms" in timing


def test_all_tasks_gives_one_row_per_task(client, cat, registry_db):
    table, note = client.predict(handle_file(cat), api_name="/predict_all")
    names = [t.name for t in Registry(registry_db).tasks()]
    assert [row[0] for row in table["data"]] == names
    col = table["headers"].index("top label")
    assert all(row[col] in CLASSES for row in table["data"])
    prob = table["headers"].index("probability")
    assert all(re.fullmatch(r"\d+\.\d%", row[prob]) for row in table["data"])  # as Predict shows them
    assert f"{len(names)} of {len(names)} task(s)" in note


def test_compare_has_a_row_per_task_in_readable_units(client):
    summary, table, params, size, storage, accuracy = client.predict(api_name="/compare")
    assert {row[0] for row in table["data"]} >= set(TASKS)
    assert re.search(r"= \*\*\d+\.\d [KMG]?B\*\*, against \*\*\d+\.\d [KMG]?B\*\*", summary)  # bold closes after B
    assert "smaller" in summary
    rows = {row[0]: dict(zip(table["headers"], row, strict=True)) for row in table["data"]}
    for name in TASKS:
        assert re.fullmatch(r"\d+\.\d K \(\d+\.\d\d%\)", rows[name]["params"])
        assert re.fullmatch(r"\d+\.\d KB", rows[name]["on disk"])
        assert re.fullmatch(r"\d+\.\d%", rows[name]["test top-1"])
    assert size["columns"][1] == "KB on disk"
    kb = {row[0]: row[1] for row in size["data"]}
    bars = {row[0] for row in params["data"]}
    assert bars >= set(TASKS) and set(kb) == bars
    assert {row[2] for row in accuracy["data"]} == bars  # the scatter shows the versions the bars show, by task
    assert all(0 <= row[1] <= 100 for row in accuracy["data"])
    assert len(storage["data"]) == 3


def test_bad_upload_gives_a_clear_message_and_the_app_stays_up(client, cat, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    labels, note = client.predict(handle_file(str(bad)), "ada", 3, api_name="/predict")
    assert not labels and "The uploaded file is not an image" in note
    assert "/tmp" not in note and "notes.png" not in note  # no server path, not even the upload's name
    labels, note = client.predict(handle_file(cat), "nope", 3, api_name="/predict")
    assert not labels and "no task 'nope' in the registry (tasks: ada, lo" in note  # a typo is not "train it"
    labels, _ = client.predict(handle_file(cat), "ada", 3, api_name="/predict")
    assert labels["label"] in CLASSES


def test_add_a_task_appears_in_the_picker(client):
    status, picker, _ = client.predict("folder", str(CIFAR_MINI), "added", "linear", 1, 32, None, None,
                                       "vit_pico_patch4_32", False, 32, 16, api_name="/train")
    assert "Trained **added** version 1" in status
    assert picker["value"] == "added"
    listed, _ = client.predict("ada", api_name="/tasks")
    assert "added" in [value for _, value in listed["choices"]] and listed["value"] == "ada"


def test_add_a_task_from_a_missing_folder_says_so(client):
    with pytest.raises(AppError, match="does not exist under the data roots"):
        client.predict("folder", str(CIFAR_MINI.parent / "nope"), "x", "adapter", 1, 32, None, 4,
                       "vit_pico_patch4_32", False, 32, 16, api_name="/train")


@pytest.mark.parametrize("dataset,folder", [("folder", "/etc"), ("folder", "../../.."), ("folder:/etc", ""),
                                            ("folder", "~")])
def test_add_a_task_outside_the_data_roots_reveals_nothing(client, dataset, folder):
    with pytest.raises(AppError) as info:
        client.predict(dataset, folder, "x", "linear", 1, 32, None, None, "vit_pico_patch4_32", False, 32, 16,
                       api_name="/train")
    message = str(info.value)
    assert "outside the data roots" in message and "--data-root" in message
    assert "passwd" not in message and "hosts" not in message  # nothing from inside the folder


def test_empty_registry_says_what_to_do(tmp_path, cat):
    app = launch(str(tmp_path / "registry.db"), port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        c = Client(app.local_url, verbose=False)
        picker, note = c.predict(None, api_name="/tasks")
        assert picker["choices"] == [] and note["visible"] is True and "adaptkit train" in note["value"]
        labels, message = c.predict(handle_file(cat), None, 3, api_name="/predict")
        assert not labels and "task" in message
        table, note = c.predict(handle_file(cat), api_name="/predict_all")
        assert table["data"] in ([], [[]]) and table["headers"][0] == "task" and "No tasks yet" in note
        assert "No tasks yet" in c.predict(api_name="/compare")[0]
    finally:
        app.close()


# -- the handlers, called directly -------------------------------------------------------------------------------

def _saved(tmp_path: Path, img: Image.Image, name: str, **kw) -> str:
    path = tmp_path / name
    img.save(path, **kw)
    return str(path)


@pytest.mark.parametrize("mode,name", [("L", "gray.png"), ("RGBA", "alpha.png"), ("CMYK", "cmyk.jpg"),
                                       ("I;16", "deep.png"), ("P", "palette.gif"), ("1", "bits.bmp")])
def test_any_image_mode_predicts(registry_db, tmp_path, mode, name):
    path = _saved(tmp_path, Image.open(CIFAR_MINI / "test" / "ship" / "0000.jpg").convert(mode), name)
    (labels,), _ = Handlers(str(registry_db)).predict([path], ["lo"], [3])
    assert set(labels) <= set(CLASSES) and len(labels) == 3


def test_truncated_image_is_refused_clearly(tmp_path, cat):
    data = Path(cat).read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        open_image(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_huge_image_is_refused_or_downscaled(tmp_path, monkeypatch):
    png = _saved(tmp_path, Image.new("RGB", (120, 120), "red"), "big.png")
    jpg = _saved(tmp_path, Image.new("RGB", (120, 120), "red"), "big.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ImageError, match="too large"):
        open_image(png)  # 14,400 pixels: over the limit and PNG cannot decode at a reduced scale
    monkeypatch.setattr("adaptkit.data.images.MAX_SIDE", 16)
    small = open_image(jpg)  # JPEG decodes at 1/4 scale, then shrinks to the side limit
    assert small.mode == "RGB" and max(small.size) <= 16
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    with pytest.raises(ImageError, match="too large"):
        open_image(jpg)  # over twice the limit: Pillow refuses to open it at all


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_broken_adapter_file_is_a_message_not_a_crash(registry_db, tmp_path, cat, damage):
    copy = tmp_path / "copy"
    shutil.copytree(registry_db.parent, copy)
    reg = Registry(copy / "registry.db")
    path = reg.path_of(reg.get_version("lo"))
    if damage == "corrupt":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.unlink()
    h = Handlers(str(copy / "registry.db"))
    labels, notes = h.predict([cat, cat], ["lo", "ada"], [3, 3])  # in one batch: the broken task fails alone
    assert labels[0] is None and "lo" in notes[0] and "Traceback" not in notes[0]
    assert set(labels[1]) <= set(CLASSES)
    table, _ = h.predict_all(cat)  # the other tasks still answer
    rows = table.set_index("task")
    assert rows.loc["ada", "top label"] in CLASSES and rows.loc["lo", "note"]


def test_a_batch_of_mixed_tasks_is_one_backbone_pass_and_equals_each_alone(registry_db, cat, tmp_path):
    ship = str(CIFAR_MINI / "test" / "ship" / "0000.jpg")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    h = Handlers(str(registry_db))
    alone = [h.predict([img], [task], [10])[0][0] for img, task in [(cat, "ada"), (ship, "lo"), (ship, "ada")]]
    passes = []
    hook = h.predictor.load("ada").model.trunk.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        labels, notes = h.predict([cat, ship, str(bad), ship, None, cat], ["ada", "lo", "ada", "ada", "lo", "nope"],
                                  [10, 10, 3, 10, 3, 3])
    finally:
        hook.remove()
    assert len(passes) == 1  # three good requests, two tasks, one trunk pass
    for got, want in zip([labels[0], labels[1], labels[3]], alone, strict=True):
        assert list(got) == list(want) and list(got.values()) == pytest.approx(list(want.values()), abs=1e-5)
    assert "in a batch of 3" in notes[0]
    assert labels[2] is None and notes[2].startswith("**Could not predict:** The uploaded file is not an image")
    assert labels[4] is None and notes[4] == gr.skip()  # no image yet: nothing to say, the line stays
    assert labels[5] is None and "no task 'nope'" in notes[5]


def test_a_task_trained_by_another_process_is_seen_without_a_restart(tmp_path, cat):
    db = make_registry(tmp_path, {"ada": "adapter"})
    h = Handlers(str(db), sync_s=0)
    assert h.predict([cat], ["ada"], [3])[1][0].startswith("`ada@1`")
    make_registry(tmp_path, {"ada": "linear", "new": "linear"})  # another writer: ada@2 becomes the default
    assert h.predict([cat], ["ada"], [3])[1][0].startswith("`ada@2`")
    picker, _ = h.tasks("ada")
    assert [value for _, value in picker["choices"]] == [AUTO, "ada", "new"] and picker["value"] == "ada"
    assert h.predict([cat], ["new"], [3])[1][0].startswith("`new@1`")


def test_training_offline_speaks_in_the_page_terms(tmp_path):
    h = Handlers(str(tmp_path / "registry.db"))
    with pytest.raises(gr.Error) as info:
        h.train("digits", "", "d", "linear", 1, 32, None, None, "vit_tiny_patch16_224.augreg_in21k", True, 32, 16)
    message = info.value.message
    assert "Pretrained weights" in message and "vit_cifar_tiny_patch4_32.adaptkit_c10" in message
    assert "--" not in message  # no CLI options the page does not have
    assert info.value.duration is None  # stays until dismissed


def test_data_roots_follow_links_and_take_relative_paths(tmp_path):
    root = tmp_path / "root"
    (root / "set" / "a").mkdir(parents=True)
    (root / "escape").symlink_to("/etc")
    h = Handlers(str(tmp_path / "registry.db"), data_roots=[root])
    assert dataset_spec("folder", "set", h.data_roots) == f"folder:{root / 'set'}"
    assert dataset_spec("folder", str(root / "set" / ".." / "set"), h.data_roots) == f"folder:{root / 'set'}"
    with pytest.raises(DatasetError, match="outside the data roots"):
        dataset_spec("folder", "escape", h.data_roots)
    with pytest.raises(DatasetError, match="trains from no folders"):
        dataset_spec("folder", str(root / "set"), [])


def test_adaptkit_ui_prints_its_address_and_no_share_hint(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "adaptkit.cli", "ui", "--registry", str(tmp_path / "registry.db"), "--port",
           str(port), "--data-root", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()
        assert first.strip() == f"adaptkit page on http://127.0.0.1:{port}/ (Ctrl+C to stop)"
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=30)[0]
    assert "share=True" not in first + rest


def test_adaptkit_ui_with_a_missing_data_root_says_so_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "adaptkit.cli", "ui", "--registry", str(tmp_path / "registry.db"), "--data-root",
           str(tmp_path / "nope")]
    out = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"error: data root {tmp_path / 'nope'} is not a folder: create it or "
                                               "pass another --data-root"]


def test_the_page_reads_adapters_from_the_store_it_is_given(registry_db, tmp_path, cat):
    shutil.copytree(registry_db.parent, tmp_path / "db")  # the database with its WAL file
    (tmp_path / "db" / "adapters").rename(tmp_path / "store")
    (labels,), _ = Handlers(str(tmp_path / "db" / "registry.db"), adapters=str(tmp_path / "store")).predict(
        [cat], ["lo"], [3])
    assert set(labels) <= set(CLASSES) and len(labels) == 3
    (labels,), (note,) = Handlers(str(tmp_path / "db" / "registry.db")).predict([cat], ["lo"], [3])
    assert labels is None and "missing" in note  # the default store, adapters/ beside the database, has no file


def test_the_pages_data_set_choices_are_never_read_against_its_working_directory(tmp_path, monkeypatch):
    for look_alike in ("digits", "cifar10", "mnist"):
        (tmp_path / look_alike / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    h = Handlers(str(tmp_path / "registry.db"))
    assert dataset_spec("digits", "", h.data_roots) == "builtin:digits"
    assert dataset_spec("CIFAR10", "", h.data_roots) == "builtin:cifar10"
    with pytest.raises(gr.Error, match="is not a data set adaptkit knows"):
        dataset_spec("pets", "", h.data_roots)
    train("builtin:digits", backbone="vit_pico_patch4_32", pretrained=False, method="linear",
          config=TrainConfig(epochs=1, limit_train=64, limit_eval=32), registry=tmp_path / "registry.db")
    assert [t.name for t in Registry(tmp_path / "registry.db").tasks()] == ["digits"]

"""The web app: served on localhost and called through gradio_client, and its handlers called directly."""

import shutil
import socket
from pathlib import Path

import gradio as gr
import pytest
from adaptkit_app.handlers import Handlers
from adaptkit_app.main import launch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from adaptkit.data import open_image
from adaptkit.errors import ImageError
from adaptkit.registry import Registry
from adaptkit.train import TrainConfig, train

CIFAR_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini"
CLASSES = sorted(p.name for p in (CIFAR_MINI / "test").iterdir()) if CIFAR_MINI.is_dir() else []
TASKS = {"ada": "adapter", "lo": "lora"}

pytestmark = [
    pytest.mark.skipif(not CIFAR_MINI.is_dir(), reason=f"{CIFAR_MINI} not present"),
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated"),  # gradio's
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    app = launch(str(registry_db), port=free_port(), prevent_thread_lock=True, quiet=True)
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
    table = client.predict(handle_file(cat), api_name="/predict_all")
    names = [t.name for t in Registry(registry_db).tasks()]
    assert [row[0] for row in table["data"]] == names
    col = table["headers"].index("top label")
    assert all(row[col] in CLASSES for row in table["data"])


def test_compare_has_a_row_per_task(client):
    summary, table, params, size, storage, accuracy = client.predict(api_name="/compare")
    assert {row[0] for row in table["data"]} >= set(TASKS)
    assert "smaller" in summary
    assert {row[0] for row in params["data"]} >= set(TASKS)
    assert len(storage["data"]) == 3


def test_bad_upload_gives_a_clear_message_and_the_app_stays_up(client, cat, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(bad)), "ada", 3, api_name="/predict")
    with pytest.raises(AppError, match="no task 'nope'"):
        client.predict(handle_file(cat), "nope", 3, api_name="/predict")
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
    with pytest.raises(AppError, match="does not exist"):
        client.predict("folder", "/no/such/folder", "x", "adapter", 1, 32, None, 4, "vit_pico_patch4_32", False,
                       32, 16, api_name="/train")


def test_empty_registry_says_what_to_do(tmp_path, cat):
    app = launch(str(tmp_path / "registry.db"), port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        c = Client(app.local_url, verbose=False)
        picker, note = c.predict(None, api_name="/tasks")
        assert picker["choices"] == [] and note["visible"] is True and "adaptkit train" in note["value"]
        labels, message = c.predict(handle_file(cat), None, 3, api_name="/predict")
        assert not labels and "task" in message
        assert c.predict(handle_file(cat), api_name="/predict_all")["data"] in ([], [[]])
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
    labels, _ = Handlers(str(registry_db)).predict(path, "lo", 3)
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
    with pytest.raises(gr.Error) as info:
        h.predict(cat, "lo", 3)
    assert "lo" in info.value.message and "Traceback" not in info.value.message
    table = h.predict_all(cat)  # the other tasks still answer
    rows = table.set_index("task")
    assert rows.loc["ada", "top label"] in CLASSES and rows.loc["lo", "note"]

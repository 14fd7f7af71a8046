"""The page's routed parts: the picker's "Auto: which task?" entry, the router's mark on All tasks, the continual
evaluation on Compare; served on localhost and called through gradio_client."""


import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from ports import free_port

from adaptkit.artifacts import load_adapter
from adaptkit.inference import split_state
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, train
from adaptkit_app.handlers import AUTO, AUTO_LABEL, Handlers
from adaptkit_app.main import launch
from tests.conftest import CIFAR_MINI

pytestmark = [
    pytest.mark.skipif(not CIFAR_MINI.is_dir(), reason=f"{CIFAR_MINI} not present"),
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated"),  # gradio's
]
CONFIG = TrainConfig(epochs=1, batch_size=32, limit_train=64, limit_eval=20)


@pytest.fixture(scope="module")
def registry_db(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("app-routing") / "registry.db")
    for name, classes in (("vehicles", "airplane,automobile,ship,truck"), ("animals", "cat,dog,horse")):
        train(f"folder:{CIFAR_MINI}", task=name, backbone="vit_pico_patch4_32", pretrained=False, method="adapter",
              config=CONFIG, registry=reg, classes=classes)
    return reg.url


@pytest.fixture(scope="module")
def client(registry_db):
    port = free_port()
    app = launch(registry_db, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(app.local_url, verbose=False)
    finally:
        app.close()


@pytest.fixture(scope="module")
def cat() -> str:
    return str(CIFAR_MINI / "test" / "cat" / "0000.jpg")


def test_the_picker_offers_auto_first_and_keeps_a_task_selected(client):
    picker, _ = client.predict(None, api_name="/tasks")
    assert picker["choices"][0] == [AUTO_LABEL, AUTO]
    assert [value for _, value in picker["choices"][1:]] == ["animals", "vehicles"]
    assert picker["value"] == "animals"
    assert client.predict(AUTO, api_name="/tasks")[0]["value"] == AUTO


def test_auto_shows_the_chosen_task_and_how_sure(client, cat, registry_db):
    labels, timing = client.predict(handle_file(cat), AUTO, 3, api_name="/predict")
    chosen = next(t for t in ("animals@1", "vehicles@1") if f"`{t}`" in timing)
    classes = {"animals@1": {"cat", "dog", "horse"}, "vehicles@1": {"airplane", "automobile", "ship", "truck"}}
    assert {c["label"] for c in labels["confidences"]} <= classes[chosen] and len(labels["confidences"]) == 3
    assert "Routed to" in timing and "% sure; runner-up" in timing


def test_auto_says_when_no_task_fits(client, tmp_path):
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise)
    labels, timing = client.predict(handle_file(str(noise)), AUTO, 2, api_name="/predict")
    assert timing.startswith("**No task fits this image**: it is less typical of the nearest task, `")
    assert "Routed to" in timing and len(labels["confidences"]) == 2  # still the nearest task's guesses


def test_all_tasks_marks_the_routers_choice(client, cat):
    table, _ = client.predict(handle_file(cat), api_name="/predict_all")
    notes = [row[table["headers"].index("note")] for row in table["data"]]
    assert sum("router's choice" in n for n in notes) == 1


def test_compare_runs_the_continual_evaluation(client):
    summary, table = client.predict(10, api_name="/continual")
    assert "average incremental accuracy" in summary
    assert [row[0] for row in table["data"]] == ["1. vehicles@1", "2. animals@1"]


def test_auto_without_statistics_says_which_command_fills_them_in(registry_db, cat, tmp_path):
    reg = Registry(registry_db)
    row = reg.get_version("animals")
    state, meta = load_adapter(reg.path_of(row))
    reg.replace_file(row, split_state(state)[0], meta)
    h = Handlers(registry_db)
    labels, notes = h.predict([cat], [AUTO], [3])  # vehicles still routes; animals is named, with the command
    assert labels[0] and "Routed to **`vehicles@1`**" in notes[0]
    assert "Routed over the other tasks; left out animals@1" in notes[0]
    assert "`adaptkit routing fit animals` (on the command line) to route to it too" in notes[0]
    state_v, meta_v = load_adapter(reg.path_of(reg.get_version("vehicles")))
    reg.replace_file(reg.get_version("vehicles"), split_state(state_v)[0], meta_v)
    labels, notes = Handlers(registry_db).predict([cat], [AUTO], [3])  # no task has statistics: nothing to route
    assert labels == [None] and "adaptkit routing fit animals vehicles" in notes[0]
    reg.replace_file(reg.get_version("vehicles"), state_v, meta_v)
    table, _ = h.predict_all(cat)  # every task answers; the router chose among those with statistics
    notes_by_task = dict(zip(table["task"], table["note"], strict=True))
    assert notes_by_task["animals"] == "not routed to: no routing statistics"
    assert notes_by_task["vehicles"].startswith("router's choice")
    reg.replace_file(reg.get_version("animals"), state, meta)  # put the statistics back for other tests


def test_auto_on_an_empty_registry(tmp_path, cat):
    labels, notes = Handlers(str(tmp_path / "r.db")).predict([cat], [AUTO], [3])
    assert labels == [None] and "no tasks to route to: train one first" in notes[0]

"""Data sets never reach outside themselves: an image a table names by URL is never fetched (a real local HTTP server
counts the requests), a saved set's state.json names only regular files inside its folder (a FIFO would hang the
reader), and through the page no file outside its data roots is read (absolute paths, '..', parquet tables, linked
class folders). Every data set is built here, in tmp_path, from real cifar10-mini images."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from adaptkit.data import load_task_data
from adaptkit.errors import DatasetError

datasets = pytest.importorskip("datasets")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini"
CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
       "crop_pct": 1.0, "crop_mode": "center"}
CLASSES = ["cat", "dog"]
pytestmark = pytest.mark.skipif(not MINI.is_dir(), reason=f"{MINI} not present")


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(autouse=True)
def _never_hang():
    """A read that blocks (a FIFO) fails the test after 60 s instead of hanging the suite."""
    def stop(*_):
        raise TimeoutError("the data set read blocked")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _images(root: Path, per_class: int = 4) -> tuple[list[str], list[int]]:
    """Copies of cifar10-mini images under ``root`` (so they lie inside it), and their labels."""
    paths, labels = [], []
    for label, c in enumerate(CLASSES):
        for src in sorted((MINI / "train" / c).glob("*.jpg"))[:per_class]:
            dest = root / "images" / c / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest)
            paths.append(str(dest))
            labels.append(label)
    return paths, labels


def _saved(folder: Path, paths: list[str], labels: list[int]) -> Path:
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    datasets.Dataset.from_dict({"img": paths, "label": labels}, features=features).save_to_disk(str(folder))
    return folder


def _arrow_file(folder: Path) -> Path:
    return folder / json.loads((folder / "state.json").read_text())["_data_files"][0]["filename"]


def _rename_images(folder: Path, new_paths: list[str]) -> pa.Table:
    """Rewrite the saved set's arrow file so its image cells name ``new_paths`` (no bytes), as a hostile or careless
    writer would; datasets' own writers would try to reach a URL while saving."""
    arrow = _arrow_file(folder)
    table = pa.ipc.open_stream(arrow.read_bytes()).read_all()  # in memory: the file is rewritten below
    index = table.schema.get_field_index("img")
    cells = pa.StructArray.from_arrays([pa.nulls(len(new_paths), pa.binary()), pa.array(new_paths, pa.string())],
                                       names=["bytes", "path"])
    table = table.set_column(index, table.schema.field(index), cells)
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return table


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1 serving one cifar10-mini image; ``hits`` counts the requests it got."""
    image = sorted((MINI / "train" / "cat").glob("*.jpg"))[0].read_bytes()
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server name
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    finally:
        httpd.shutdown()
        httpd.server_close()


def _refused(match: str, *args, **kwargs) -> str:
    with pytest.raises(DatasetError, match=match) as info:
        load_task_data(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_images_named_by_url_are_never_fetched(tmp_path, server):
    url, hits = server
    paths, labels = _images(tmp_path)
    saved = _saved(tmp_path / "saved", paths, labels)
    table = _rename_images(saved, [paths[0], *(f"{url}/img{i}.png" for i in range(1, len(paths)))])
    _refused(r"row 1 of the train split of hf-disk:.* names its image by URL \(http://\.\.\.\): adaptkit never "
             "fetches", f"hf-disk:{saved}", CFG)
    pq.write_table(table, tmp_path / "remote.parquet")  # the same table as a parquet file
    _refused("names its image by URL", f"hf-files:{tmp_path / 'remote.parquet'}", CFG)
    assert hits == []  # nothing was requested, not even the size of a file


def test_a_url_met_while_reading_a_row_is_refused_too(tmp_path, server):
    """HFImages decodes cells itself: even a row that escaped the check at load is never fetched."""
    from adaptkit.data import HFImages

    url, hits = server
    paths, labels = _images(tmp_path, per_class=1)
    saved = _saved(tmp_path / "saved", paths, labels)
    _rename_images(saved, [f"{url}/a.png", paths[1]])
    table = datasets.load_from_disk(str(saved)).cast_column("img", datasets.Image(decode=False))
    with pytest.raises(DatasetError, match="named by URL.*never fetches"):
        HFImages(table, "img", labels, "x")[0]
    assert HFImages(table, "img", labels, "x")[1][0].size == (32, 32) and hits == []


def test_state_json_names_only_regular_files_inside_the_folder(tmp_path):
    paths, labels = _images(tmp_path)
    saved = _saved(tmp_path / "saved", paths, labels)
    arrow, state = _arrow_file(saved), saved / "state.json"
    good = json.loads(state.read_text())
    outside = tmp_path / "outside.arrow"
    shutil.copy(arrow, outside)  # a real arrow file beside the folder
    for name in ("../outside.arrow", str(outside), "sub/../../outside.arrow"):
        state.write_text(json.dumps({**good, "_data_files": [{"filename": name}]}))
        _refused("names the data file .* which is not a plain file name inside the data set's folder",
                 f"hf-disk:{saved}", CFG)
    os.mkfifo(saved / "data-fifo.arrow")  # opened, it would block its reader forever
    state.write_text(json.dumps({**good, "_data_files": [{"filename": "data-fifo.arrow"}]}))
    _refused("data file data-fifo.arrow of saved is not a regular file", f"hf-disk:{saved}", CFG)
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["../.."]}))
    _refused(r"names the split '\.\./\.\.', which is not a plain folder name", f"hf-disk:{saved}", CFG)
    (saved / "dataset_dict.json").unlink()
    state.write_text(json.dumps(good))
    assert len(load_task_data(f"hf-disk:{saved}", CFG, val_fraction=0.0).classes) == 2  # the folder as written


def test_a_fifo_among_parquet_files_is_refused_unopened(tmp_path):
    paths, labels = _images(tmp_path)
    saved = _saved(tmp_path / "saved", paths, labels)
    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.load_from_disk(str(saved)).to_parquet(str(folder / "train.parquet"))
    os.mkfifo(folder / "test.parquet")
    _refused("parquet file .*test.parquet is not a regular file", f"hf-files:{folder}", CFG)


# -- through the page: nothing outside its data roots -------------------------------------------------------------


@pytest.fixture
def page(tmp_path):
    """Handlers with one data root, ``root``, holding its own images; cifar10-mini lies outside it."""
    from adaptkit_app.handlers import Handlers

    root = tmp_path / "root"
    root.mkdir()
    return Handlers(str(tmp_path / "registry.db"), data_roots=[root]), root


def _page_refuses(page, spec: str, match: str) -> None:
    import gradio as gr

    handlers, _ = page
    with pytest.raises(gr.Error, match=match):
        handlers.train(spec, "", "t", "linear", 1, 4, None, None, "vit_pico_patch4_32", False, 4, 4)
    assert not handlers.registry.exists or not handlers.registry.tasks()


def test_the_page_reads_no_image_outside_its_roots(page, tmp_path):
    handlers, root = page
    inside, labels = _images(root)
    outside = [str(p) for c in CLASSES for p in sorted((MINI / "train" / c).glob("*.jpg"))[:4]]
    absolute = _rename_images(_saved(root / "absolute", inside, labels), outside)
    _page_refuses(page, f"hf-disk:{root / 'absolute'}", "the image of row 0 .* lies outside the data roots")
    traversal = [f"{root}/images/{os.path.relpath(p, root / 'images')}" for p in outside]  # root/images/../..
    _rename_images(_saved(root / "traversal", inside, labels), traversal)
    _page_refuses(page, f"hf-disk:{root / 'traversal'}", "lies outside the data roots")
    pq.write_table(absolute, root / "outside.parquet")  # a parquet table inside the roots naming files outside
    _page_refuses(page, f"hf-files:{root / 'outside.parquet'}", "lies outside the data roots")
    linked = root / "linked"
    shutil.copytree(root / "images" / "dog", linked / "dog")
    (linked / "cat").symlink_to(MINI / "train" / "cat")  # a class folder that is a link out of the roots
    _page_refuses(page, f"folder:{linked}", "class folder 'cat' of linked .* lies outside the data roots")
    message = str(pytest.raises(DatasetError, load_task_data, f"folder:{linked}", CFG,
                                data_roots=handlers.data_roots).value)
    assert str(MINI) not in message  # a refusal never says where the link leads
    # the same data sets with their images inside the roots are read
    _saved(root / "good", inside, labels)
    assert load_task_data(f"hf-disk:{root / 'good'}", CFG, data_roots=handlers.data_roots).classes == CLASSES
    assert load_task_data(f"folder:{root / 'images'}", CFG, data_roots=handlers.data_roots).classes == CLASSES
    assert load_task_data(f"folder:{linked}", CFG).classes == CLASSES  # the command line's own folders may link


def test_data_roots_refuse_the_hub_and_keep_the_built_in_sets(tmp_path):
    _refused("comes from the Hugging Face hub, which is not inside the data roots", "hf:someone/set", CFG,
             data_roots=[tmp_path])
    # the built-in sets name no path: the page trains them whatever its roots (its default task is digits)
    assert len(load_task_data("digits", CFG, data_roots=[tmp_path], limit_train=8).classes) == 10

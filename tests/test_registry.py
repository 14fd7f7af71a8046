"""Registry: versions, defaults, atomic adds and removes, concurrent writers, export and import.

Every test that takes ``registry`` runs on SQLite and on a real PostgreSQL server (see pgserver.py)."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from safetensors.torch import load_file

from adaptkit.artifacts import AdapterMeta
from adaptkit.errors import ConfigError, NotFoundError, RegistryError
from adaptkit.registry import OWNER_FILE, Registry


def _meta(task: str = "demo", **overrides) -> AdapterMeta:
    values = dict(task=task, classes=["a", "b"], method="linear", method_config={}, backbone="vit_pico_patch4_32",
                  backbone_weights="random", backbone_fingerprint="f" * 64, backbone_params=1000, backbone_dim=64,
                  data_config={"input_size": [3, 32, 32]}, dataset="folder:x", metrics={"test_top1": 0.75})
    values.update(overrides)
    return AdapterMeta(**values)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"head.weight": torch.randn(2, 64, generator=g), "head.bias": torch.zeros(2)}


def _files(reg: Registry) -> list:
    return sorted(p for p in reg.adapter_dir.rglob("*") if p.is_file() and p.name != OWNER_FILE)


@pytest.fixture
def registry(registry_url, tmp_path) -> Registry:
    return Registry(registry_url, adapter_dir=tmp_path / "adapters")


def test_versions_defaults_and_files(registry):
    v1 = registry.add_version(_meta(), _state(1), train_info={"train_time_s": 2.5, "device": "cpu"})
    v2 = registry.add_version(_meta(), _state(2))
    assert (v1.version, v2.version) == (1, 2)
    assert v1.trainable_params == 130 and v1.train_time_s == 2.5 and v1.device == "cpu"
    assert registry.get_version("demo").version == 2  # the newest is the default
    assert registry.get_version("demo@1").sha256 == v1.sha256
    assert registry.path_of(v1).stat().st_size == v1.bytes
    registry.set_default("demo@1")
    assert registry.get_version("demo").version == 1
    assert [t.name for t in registry.tasks()] == ["demo"]


def test_missing_refs_have_clear_errors(registry):
    registry.add_version(_meta(), _state())
    with pytest.raises(NotFoundError, match="no task 'other'.*tasks: demo"):
        registry.get_version("other")
    with pytest.raises(NotFoundError, match="has no version 7 .versions: 1."):
        registry.get_version("demo@7")
    with pytest.raises(ConfigError, match="TASK@N"):
        registry.get_version("demo@latest")
    with pytest.raises(ConfigError, match="bad task name"):
        registry.add_version(_meta(task="no/slashes"), _state())


def test_remove_version_then_task(registry):
    registry.add_version(_meta(), _state(1))
    registry.add_version(_meta(), _state(2))
    assert len(_files(registry)) == 2
    assert registry.remove("demo@2") == ["demo@2"]
    assert registry.get_version("demo").version == 1  # the default moved to what is left
    assert len(_files(registry)) == 1
    assert registry.remove("demo") == ["demo@1"]
    assert registry.tasks() == [] and _files(registry) == []


def test_failed_add_leaves_no_row_and_no_file(registry, monkeypatch):
    def broken_insert(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(registry, "_insert", broken_insert)
    with pytest.raises(RuntimeError, match="disk full"):
        registry.add_version(_meta(), _state())
    assert _files(registry) == []
    monkeypatch.undo()
    assert registry.tasks() == []

    def broken_put(rel, data):
        raise RegistryError("cannot write adapter file: the disk is full")

    monkeypatch.setattr(registry.storage, "put", broken_put)
    with pytest.raises(RegistryError, match="disk is full"):
        registry.add_version(_meta(), _state())
    assert registry.tasks() == []


def test_default_url_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTKIT_REGISTRY", f"sqlite:///{tmp_path / 'env.db'}")
    reg = Registry()
    reg.add_version(_meta(), _state())
    assert (tmp_path / "env.db").is_file()
    assert reg.adapter_dir == tmp_path / "adapters"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTKIT_REGISTRY")
    assert Registry().url.endswith("registry.db")


def _add_eight(url: str, adapters: str, n: int) -> None:
    """One writer process: four versions of its own task and four of the shared task "race", interleaved."""
    reg = Registry(url, adapter_dir=adapters)
    for i in range(8):
        meta = _meta(task="race" if i % 2 else f"proc{n}", classes=["a"])
        reg.add_version(meta, {"head.weight": torch.full((1, 1), float(i)), "head.bias": torch.zeros(1)})


def test_processes_adding_at_once_lose_nothing(registry_url, tmp_path):
    adapters = tmp_path / "adapters"
    # forked, so the writers start at once without importing torch again; no registry yet: they race to create it
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_eight, args=(registry_url, str(adapters), n)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    reg = Registry(registry_url, adapter_dir=adapters)
    tasks = {t.name: t for t in reg.tasks()}
    assert [v.version for v in tasks["race"].versions] == list(range(1, 13))  # unique and contiguous
    assert [len(tasks[f"proc{n}"].versions) for n in range(3)] == [4, 4, 4]
    # files are named by content: the three writers add the same four "race" adapters, which share their files
    rows = {reg.path_of(v) for t in tasks.values() for v in t.versions}
    assert set(_files(reg)) == rows and len(rows) == 3 * 4 + 4
    assert [sum(v.is_default for v in t.versions) for t in tasks.values()] == [1, 1, 1, 1]
    assert tasks["race"].default.version == 12


@pytest.mark.parametrize("store", ["folder", "memory"])
def test_a_remove_during_an_add_of_the_same_content_keeps_the_new_versions_file(registry_url, tmp_path, store):
    """Files are named by content: removing the only version that has one, while another writer is storing the same
    file for a row that has not committed yet, must not delete the file under the new row."""
    import threading
    import uuid

    adapters = tmp_path / "adapters" if store == "folder" else f"memory://race-{uuid.uuid4().hex}"
    reg = Registry(registry_url, adapter_dir=adapters)
    reg.add_version(_meta(), _state(1))
    reg.add_version(_meta(), _state(2))
    stored, commit = threading.Event(), threading.Event()
    writer = Registry(registry_url, adapter_dir=adapters)
    insert = writer._insert

    def paused(*args, **kwargs):  # the file is stored; the row is not committed yet
        stored.set()
        assert commit.wait(30)
        return insert(*args, **kwargs)

    writer._insert = paused
    errors = []
    thread = threading.Thread(target=lambda: _call(errors, writer.add_version, _meta(), _state(1)))
    thread.start()
    assert stored.wait(30)
    assert Registry(registry_url, adapter_dir=adapters).remove("demo@1") == ["demo@1"]
    commit.set()
    thread.join(60)
    assert not errors
    new = reg.get_version("demo@3")
    assert reg.storage.exists(new.file) and reg.load_version(new)[0]["head.weight"].equal(_state(1)["head.weight"])
    reg.remove("demo@2")  # no writer in flight: its file goes at once
    assert {f.rel for f in reg.storage.files() if f.rel.endswith(".safetensors")} == {new.file}


def _call(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def test_export_import_round_trip(registry, tmp_path):
    v = registry.add_version(_meta(), _state(3))
    dest = registry.export("demo", tmp_path / "out.safetensors")
    with pytest.raises(ConfigError, match="exists already"):
        registry.export("demo", dest)
    (tmp_path / "other").mkdir()
    other = Registry(tmp_path / "other" / "r.db")
    imported = other.import_file(dest, task="copy")
    assert imported.ref == "copy@1" and imported.metrics == v.metrics
    assert load_file(other.path_of(imported))["head.weight"].equal(_state(3)["head.weight"])


def test_a_version_with_other_classes_is_refused(registry):
    registry.add_version(_meta(), _state())
    with pytest.raises(ConfigError, match="pick another task$"):
        registry.check_classes("demo", ["x", "y", "z"])
    with pytest.raises(ConfigError, match="cannot join it"):
        registry.add_version(_meta(classes=["x", "y"]), _state())
    assert len(registry.get_version("demo").task.versions) == 1
    assert len(_files(registry)) == 1  # the refused version's file was removed again


def test_a_writer_kept_waiting_gives_up_clearly_and_leaves_no_file(registry_url, tmp_path, monkeypatch):
    import adaptkit.registry.db

    monkeypatch.setattr(adaptkit.registry.db, "LOCK_TIMEOUT_S", 0.2)
    registry = Registry(registry_url, adapter_dir=tmp_path / "adapters")
    registry.add_version(_meta(), _state(1))
    holder = Registry(registry_url, adapter_dir=tmp_path / "adapters")
    with holder.transaction():  # another writer holds the registry's write lock throughout
        with pytest.raises(RegistryError, match="is busy or unwritable"):
            registry.add_version(_meta(), _state(2))
    assert len(_files(registry)) == 1
    assert registry.add_version(_meta(), _state(3)).version == 2  # and works once the lock is free


def test_two_registries_sharing_an_adapter_folder_never_sweep_each_others_files(tmp_path):
    """a.db and b.db side by side share adapters/: the registry that wrote there first owns it; the other is refused
    before it writes, so neither ever takes the other's files for orphans."""
    a, b = Registry(tmp_path / "a.db"), Registry(tmp_path / "b.db")
    kept = a.path_of(a.add_version(_meta(task="t"), _state(1)))
    with pytest.raises(RegistryError, match=r"belongs to the registry .*a\.db .*\$ADAPTKIT_ADAPTERS"):
        b.add_version(_meta(task="t"), _state(2))
    assert a.owns_store() and not b.owns_store() and b.tasks() == []
    orphan = kept.parent / ("0" * 64 + ".safetensors")
    orphan.write_bytes(b"left by a crash")
    assert b.sweep() == [] and orphan.is_file()  # not b's to judge
    assert a.sweep() == [f"t/{orphan.name}"] and kept.is_file()
    c = Registry(tmp_path / "c.db", adapter_dir=tmp_path / "c-adapters")  # its own folder: no conflict
    assert c.path_of(c.add_version(_meta(task="t"), _state(2))).is_file() and kept.is_file()

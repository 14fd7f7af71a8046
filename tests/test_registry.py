"""Registry: versions, defaults, atomic adds and removes, concurrent writers, export and import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from adaptkit.artifacts import AdapterMeta
from adaptkit.errors import ConfigError, NotFoundError
from adaptkit.registry import Registry


def _meta(task: str = "demo", **overrides) -> AdapterMeta:
    values = dict(task=task, classes=["a", "b"], method="linear", method_config={}, backbone="vit_pico_patch4_32",
                  backbone_weights="random", backbone_fingerprint="f" * 64, backbone_params=1000, backbone_dim=4,
                  data_config={"input_size": [3, 32, 32]}, dataset="folder:x", metrics={"test_top1": 0.75})
    values.update(overrides)
    return AdapterMeta(**values)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"head.weight": torch.randn(2, 4, generator=g), "head.bias": torch.zeros(2)}


def _files(reg: Registry) -> list:
    return sorted(p for p in reg.adapter_dir.rglob("*") if p.is_file())


def test_versions_defaults_and_files(registry):
    v1 = registry.add_version(_meta(), _state(1), train_info={"train_time_s": 2.5, "device": "cpu"})
    v2 = registry.add_version(_meta(), _state(2))
    assert (v1.version, v2.version) == (1, 2)
    assert v1.trainable_params == 10 and v1.train_time_s == 2.5 and v1.device == "cpu"
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

    import adaptkit.artifacts as module  # the registry imports it when it writes, so that reading needs no torch

    def broken_save(path, *args):
        raise OSError("no space left")

    monkeypatch.setattr(module, "save_adapter", broken_save)
    with pytest.raises(OSError):
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


def test_two_processes_adding_at_once_lose_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    Registry(url)  # create the tables first, as a user's first command would
    script = textwrap.dedent(f"""
        import sys, torch
        from adaptkit.artifacts import AdapterMeta
        from adaptkit.registry import Registry
        reg = Registry({url!r})
        for i in range(12):
            meta = AdapterMeta(task="race" if i % 2 else "proc" + sys.argv[1], classes=["a"], method="linear",
                               method_config={{}}, backbone="b", backbone_weights="random",
                               backbone_fingerprint="f" * 64, backbone_params=1, backbone_dim=1, data_config={{}})
            reg.add_version(meta, {{"head.weight": torch.full((1, 1), float(i)), "head.bias": torch.zeros(1)}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)]) for n in range(2)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    reg = Registry(url)
    tasks = {t.name: t for t in reg.tasks()}
    assert sorted(v.version for v in tasks["race"].versions) == list(range(1, 13))
    assert len(tasks["proc0"].versions) == len(tasks["proc1"].versions) == 6
    assert len(_files(reg)) == 24
    assert sum(v.is_default for v in tasks["race"].versions) == 1


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
    with pytest.raises(ConfigError, match="pick another --task name"):
        registry.check_classes("demo", ["x", "y", "z"])
    with pytest.raises(ConfigError, match="cannot join it"):
        registry.add_version(_meta(classes=["x", "y"]), _state())
    assert len(registry.get_version("demo").task.versions) == 1
    assert len(_files(registry)) == 1  # the refused version's file was removed again

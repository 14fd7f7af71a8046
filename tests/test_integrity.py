"""The registry's files can be trusted: complete validation of adapter files, names and paths proven inside the
registry, bad rows shown as broken, the registry itself as a bad input, crash leftovers swept, `adaptkit doctor`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from typer.testing import CliRunner

from adaptkit.artifacts import AdapterMeta, adapter_bytes, tensors_sha256
from adaptkit.cli import app
from adaptkit.errors import ArtifactError, ConfigError, RegistryError
from adaptkit.methods import get_method
from adaptkit.registry import OWNER_FILE, Registry

PICO = "vit_pico_patch4_32"


def _meta(task: str = "demo", **overrides) -> AdapterMeta:
    values = dict(task=task, classes=["a", "b"], method="linear", method_config={}, backbone=PICO,
                  backbone_weights="random", backbone_fingerprint="f" * 64, backbone_params=1000, backbone_dim=64,
                  data_config={"input_size": [3, 32, 32]}, dataset="folder:x", metrics={"test_top1": 0.75})
    values.update(overrides)
    return AdapterMeta(**values)


def _state(seed: int = 0, classes: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"head.weight": torch.randn(classes, 64, generator=g), "head.bias": torch.zeros(classes)}


def _lora(pico) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    task = get_method("lora", {"rank": 2}).attach(pico.model, 2)
    state = {k: v.clone() for k, v in task.state().items()}
    task.detach_from_trunk()
    return state, _meta(method="lora", method_config=task.method.config_dict(), backbone_fingerprint=pico.fingerprint)


def _write(path, state: dict[str, torch.Tensor], meta: AdapterMeta, **meta_strings: str):
    """An adapter file as a careless or hostile exporter would write it: any tensors, any metadata strings."""
    strings = meta.to_strings(tensors_sha256(state))
    strings.update(meta_strings)
    path.write_bytes(save(state, metadata=strings))
    return path


def _files(reg: Registry) -> set:
    return {p for p in reg.adapter_dir.rglob("*") if p.is_file() and p.name != OWNER_FILE} \
        if reg.adapter_dir.exists() else set()


def _cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


# -- complete validation of adapter files -----------------------------------------------------------------------

BAD_FILES = [  # (what is changed, the error's text)
    ({"metrics": "[0.5]"}, "metrics must be a dict of numbers"),
    ({"metrics": '{"test_top1": "high"}'}, "metrics must be a dict of numbers"),
    ({"method": "bogus"}, "unknown method"),
    ({"method_config": '{"rank": -1}'}, "whole number in [1, 4096], got -1"),
    ({"method_config": '{"rank": 2, "alpha": NaN}'}, "alpha must be a finite number, got nan"),
    ({"classes": '["a", "a"]'}, "classes must be unique"),
    ({"classes": "[]"}, "classes must be a non-empty list"),
    ({"classes": '["a", 3]'}, "every class must be a non-empty string"),
    ({"task": "demo\n"}, "task name"),
    ({"task": "../../esc"}, "task name"),
    ({"backbone": "no_such_vit"}, "not a model timm knows"),
    ({"backbone_weights": "http://x"}, "not one of hub, package, random, file:PATH"),
    ({"backbone_weights": "file:/etc/passwd"}, "this registry does not know"),
    ({"backbone_fingerprint": "zz"}, "64 hex digits"),
    ({"backbone_dim": "-3"}, "backbone_dim must be a positive integer"),
    ({"method_config": '{"rank": 3}'}, "has shape"),  # the tensors are rank 2
    ({"method_config": "[" * 100_000 + "]" * 100_000}, "has damaged metadata"),  # deeper than json reads
]
BAD_TENSORS = [  # (how the tensors are changed, the error's text)
    ("head of 10 classes", "head head.weight has shape (10, 64), expected (2, 64)"),
    ("missing tensor", "missing ['blocks.0.attn.qkv.lora.lora_A']"),
    ("extra tensor", "unexpected ['extra']"),
    ("float64", "is torch.float64"),
    ("int8", "is torch.int8"),
    ("nan", "NaN or infinite"),
    ("huge head", "tensor head.weight holds values up to 3e+38, beyond 10000"),  # finite, but logits overflow
]


def _bad_tensors(state: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    first = "blocks.0.attn.qkv.lora.lora_A"
    if how == "head of 10 classes":
        state["head.weight"], state["head.bias"] = torch.zeros(10, 64), torch.zeros(10)
    elif how == "missing tensor":
        del state[first]
    elif how == "extra tensor":
        state["extra"] = torch.zeros(1)
    elif how == "float64":
        state[first] = state[first].double()
    elif how == "int8":
        state[first] = state[first].to(torch.int8)
    elif how == "nan":
        state[first] = state[first].clone().fill_(float("nan"))
    elif how == "huge head":
        state["head.weight"] = torch.full_like(state["head.weight"], 3e38)
    return state


@pytest.mark.parametrize(("strings", "message"), BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_import_refuses_bad_metadata_and_keeps_the_registry_as_it_was(pico, registry, tmp_path, strings, message):
    state, meta = _lora(pico)
    path = _write(tmp_path / "bad.safetensors", state, meta, **strings)
    with pytest.raises(ArtifactError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        registry.import_file(path)
    assert registry.tasks() == [] and _files(registry) == set()


@pytest.mark.parametrize(("how", "message"), BAD_TENSORS, ids=[h for h, _ in BAD_TENSORS])
def test_import_refuses_tensors_the_method_does_not_build(pico, registry, tmp_path, how, message):
    state, meta = _lora(pico)
    path = _write(tmp_path / "bad.safetensors", _bad_tensors(state, how), meta)
    with pytest.raises(ArtifactError) as info:
        registry.import_file(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert registry.tasks() == [] and _files(registry) == set()


def test_a_good_file_imports_once_then_is_a_duplicate(pico, registry, tmp_path):
    state, meta = _lora(pico)
    path = _write(tmp_path / "good.safetensors", state, meta)
    v = registry.import_file(path)
    assert v.ref == "demo@1" and v.trainable_params == sum(t.numel() for t in state.values())
    with pytest.raises(ConfigError, match="identical to demo@1"):
        registry.import_file(path)
    assert registry.import_file(path, task="copy").ref == "copy@1"  # the same file under another task is new
    with pytest.raises(ConfigError, match="bad task name"):
        registry.import_file(path, task="x\n")


def test_absurd_settings_are_refused_without_allocating(pico):
    from adaptkit.registry.validate import expected_shapes

    with pytest.raises(ArtifactError, match=r"whole number in \[1, 4096\], got 10000000"):
        expected_shapes(PICO, "lora", json.dumps({"rank": 10**7}), 2)
    assert expected_shapes(PICO, "lora", json.dumps({"rank": 2}), 2)["head.weight"] == (2, 64)


def test_half_precision_is_widened_and_other_dtypes_refused_on_load(tmp_path):
    from adaptkit.artifacts import load_adapter

    half = {k: v.half() for k, v in _state().items()}
    state, _ = load_adapter(_write(tmp_path / "h.safetensors", half, _meta()))
    assert all(t.dtype == torch.float32 for t in state.values())
    assert torch.equal(state["head.weight"], half["head.weight"].float())
    with pytest.raises(ArtifactError, match="float64"):
        load_adapter(_write(tmp_path / "d.safetensors", {k: v.double() for k, v in _state().items()}, _meta()))


def test_cli_import_of_a_bad_file_is_one_line(pico, tmp_path):
    state, meta = _lora(pico)
    path = _write(tmp_path / "bad.safetensors", state, meta, metrics="[1]")
    out = _cli("import", path, "--registry", tmp_path / "r.db", code=1)
    assert out.startswith("error:") and out.count("\n") == 1 and "metrics must be a dict" in out


def test_adapter_files_honour_the_umask(registry):
    old = os.umask(0o022)
    try:
        v = registry.add_version(_meta(), _state())
    finally:
        os.umask(old)
    assert registry.path_of(v).stat().st_mode & 0o777 == 0o644


# -- names and paths from the database ------------------------------------------------------------------------


def _tamper(reg: Registry, sql: str, *params) -> None:
    db = reg.url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:
        con.execute(sql, params)


def test_a_trailing_newline_is_not_a_task_name(registry):
    with pytest.raises(ConfigError, match="bad task name"):
        registry.add_version(_meta(task="demo\n"), _state())
    from adaptkit.artifacts import TASK_NAME

    assert TASK_NAME.match("demo\n") is None and TASK_NAME.match("demo") is not None


@pytest.mark.parametrize("target", ["../../outside.safetensors", "ABSOLUTE", "demo/link.safetensors"])
def test_remove_never_deletes_outside_the_adapter_folder(registry, tmp_path, target):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"precious")
    v = registry.add_version(_meta(), _state())
    if target == "demo/link.safetensors":
        (registry.adapter_dir / target).symlink_to(outside)
    value = str(outside) if target == "ABSOLUTE" else target
    _tamper(registry, "UPDATE adapter_versions SET file = ? WHERE id = ?", value, v.id)
    with pytest.raises(RegistryError, match="doctor"):
        registry.path_of(registry.get_version("demo@1", allow_broken=True))
    assert registry.remove("demo") == ["demo@1"]
    assert outside.read_bytes() == b"precious"


def test_export_with_a_hostile_task_name_writes_nothing_outside(registry, tmp_path):
    registry.add_version(_meta(), _state())
    _tamper(registry, "UPDATE tasks SET name = '../../esc'")
    dest = tmp_path / "a" / "b"
    dest.mkdir(parents=True)
    with pytest.raises(RegistryError, match="broken"):
        registry.export("../../esc", dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "esc-v1.safetensors").exists()


def test_export_into_a_missing_folder_is_a_clear_error(registry, tmp_path):
    registry.add_version(_meta(), _state())
    with pytest.raises(ConfigError, match="does not exist: create it first"):
        registry.export("demo", tmp_path / "nowhere" / "x.safetensors")


# -- a bad row never takes list, compare or the page down --------------------------------------------------------


@pytest.mark.parametrize(("sql", "why"), [
    ("UPDATE adapter_versions SET metrics = '{bad json'", "metrics must be a dict of numbers"),
    ("UPDATE adapter_versions SET metrics = '[1, 2]'", "metrics must be a dict of numbers"),
    ("UPDATE adapter_versions SET trainable_params = 'many'", "trainable_params is not a count"),
    ("UPDATE adapter_versions SET created_at = 'yesterday', train_time_s = 'slow'", "not a number"),
    ("UPDATE adapter_versions SET train_time_s = NULL, device = NULL, sha256 = 'x'", "sha256"),
    ("UPDATE tasks SET classes = '\"a\"'", "classes are not a list"),
    ("UPDATE backbones SET embed_dim = 'wide'", "backbone_dim must be a positive integer"),
])
def test_bad_rows_are_shown_as_broken_and_the_rest_kept(registry, tmp_path, sql, why):
    from adaptkit.compare import compare

    registry.add_version(_meta("good"), _state(1))
    registry.add_version(_meta("demo", backbone_fingerprint="e" * 64), _state(2))
    good_ids = [v.id for t in registry.tasks() if t.name == "good" for v in t.versions]
    where = " WHERE id NOT IN (SELECT backbone_id FROM adapter_versions WHERE id = ?)" if "backbones" in sql else (
        " WHERE name != 'good'" if "tasks" in sql else " WHERE id != ?")
    _tamper(registry, sql + where, *([] if "tasks" in sql else good_ids))
    tasks = {t.name: t for t in registry.tasks()}
    assert tasks["good"].broken is None and why in tasks["demo"].broken
    report = compare(registry)
    assert [r.task for r in report.rows] == ["good"] and why in report.broken[0]
    with pytest.raises(RegistryError, match="broken"):
        registry.get_version("demo")
    listed = _cli("list", "--registry", registry.url)
    assert "good" in listed and "broken demo" in listed
    _cli("compare", "--registry", registry.url)

    from adaptkit_app.handlers import Handlers

    picker, _ = Handlers(registry.url).tasks()
    labels = dict((value, label) for label, value in picker["choices"])
    assert labels["demo"].startswith("demo · broken") and "broken" not in labels["good"]


# -- the registry itself as a bad input ----------------------------------------------------------------------------


def _not_a_registry(tmp_path, kind: str):
    path = tmp_path / "r.db"
    if kind == "text file":
        path.write_text("hello\n")
    elif kind == "another program's SQLite":
        with sqlite3.connect(path) as con:
            con.execute("CREATE TABLE invoices (id INTEGER)")
    elif kind == "corrupted database":
        reg = Registry(path)
        reg.add_version(_meta(), _state())
        reg.engine.dispose()  # WAL: the last connection to close checkpoints the log into the file, then deletes it
        data = bytearray(path.read_bytes())
        data[0:100] = b"\xff" * 100
        path.write_bytes(bytes(data))
    elif kind == "adapters is a file":
        (tmp_path / "adapters").write_text("not a folder")
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("text file", "is not a SQLite database or is damaged"),
    ("another program's SQLite", "another program's database, not an adaptkit registry (tables invoices)"),
    ("corrupted database", "is not a SQLite database or is damaged"),
    ("adapters is a file", "is a file: move it away"),
])
def test_a_bad_registry_path_is_one_line_and_left_as_it_was(tmp_path, kind, message):
    path = _not_a_registry(tmp_path, kind)
    before = path.read_bytes() if path.exists() else None
    for command in (["list"], ["compare"], ["doctor"], ["remove", "demo", "--yes"]):
        out = _cli(*command, "--registry", path, code=1)
        assert message in out and out.startswith("error:") and out.count("\n") == 1, out
    if before is not None:
        assert path.read_bytes() == before


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE makes every write past 64 kB fail as a full disk would (EFBIG instead of ENOSPC)."""
    from dataclasses import asdict

    db = tmp_path / "r.db"
    Registry(db).add_version(_meta("small"), _state())
    script = textwrap.dedent(f"""
        import resource, torch
        from adaptkit.artifacts import AdapterMeta
        from adaptkit.errors import AdaptkitError
        from adaptkit.registry import Registry
        reg = Registry({str(db)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))
        try:
            reg.add_version(AdapterMeta(**{asdict(_meta("big"))!r}), {{"head.weight": torch.zeros(2, 64),
                            "head.bias": torch.zeros(2), "x": torch.zeros(40_000)}})
        except AdaptkitError as exc:
            print("ERROR", exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "ERROR cannot write adapter file" in out.stdout and "too large" in out.stdout, out.stdout + out.stderr
    reg = Registry(db)
    assert [t.name for t in reg.tasks()] == ["small"]
    assert {p.name for p in _files(reg)} == {reg.path_of(reg.get_version("small")).name}


# -- crash leftovers and doctor --------------------------------------------------------------------------------------

# A writer that pauses at one point of a save (so that the test can kill it there), with nothing imported beyond
# what a save needs, so that three start at once in a few seconds.
WRITER = """
import sys, time, torch
import adaptkit.artifacts as artifacts
from adaptkit.artifacts import AdapterMeta
from adaptkit.registry import Registry

def pause(*args, **kwargs):
    print("READY", flush=True)
    time.sleep(300)

reg = Registry(sys.argv[1])
point = sys.argv[2]
if point == "temp file written":
    artifacts.os.replace = pause
elif point == "file renamed, row not committed":
    reg._insert = pause
elif point == "row committed":
    reg.sweep = pause
meta = AdapterMeta(**{meta!r})
reg.add_version(meta, {{"head.weight": torch.ones(2, 64), "head.bias": torch.zeros(2)}})
"""
POINTS = ["temp file written", "file renamed, row not committed", "row committed"]


def _consistent(reg: Registry) -> None:
    """No temporary or orphan file; every row's file present and matching its sha256."""
    rows = {reg.path_of(v): v.sha256 for t in reg.tasks() for v in t.versions}
    assert _files(reg) == set(rows)
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == sha for p, sha in rows.items())


def test_kill_9_during_a_save_then_the_next_command_leaves_a_clean_registry(tmp_path):
    from dataclasses import asdict

    script = WRITER.format(meta=asdict(_meta("crash")))
    dbs = {point: tmp_path / f"r{i}" / "r.db" for i, point in enumerate(POINTS)}
    procs = {}
    for point, db in dbs.items():
        db.parent.mkdir()
        Registry(db).add_version(_meta("before"), _state(1))
        procs[point] = subprocess.Popen([sys.executable, "-c", script, str(db), point], stdout=subprocess.PIPE,
                                        text=True)
    try:
        for point, proc in procs.items():
            assert proc.stdout.readline().strip() == "READY", point
            reg = Registry(dbs[point])
            in_flight = _files(reg)
            assert reg.sweep() == [] and _files(reg) == in_flight  # a live writer's files are never swept
    finally:
        for proc in procs.values():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    for point in POINTS:
        reg = Registry(dbs[point])
        assert len(_files(reg)) == 2, point  # the dead writer's temporary, orphan or committed file
        reg.add_version(_meta("after"), _state(2))  # the next command
        _consistent(reg)
        crashed = {"crash"} if point == "row committed" else set()
        assert {t.name for t in reg.tasks()} == {"before", "after"} | crashed, point


def test_doctor_piped_says_all_is_well_on_one_line(registry, monkeypatch):
    registry.add_version(_meta("ok"), _state())
    monkeypatch.setenv("COLUMNS", "80")
    lines = _cli("doctor", "--registry", registry.url).splitlines()
    assert len(lines) == 1 and lines[0].startswith("registry sqlite") and len(lines[0]) > 80, lines
    assert lines[0].endswith(": every row has its file, nothing left over")


def test_doctor_reports_and_repairs_everything(registry, tmp_path):
    for i, name in enumerate(["ok", "gone", "flipped", "tampered", "mistyped"]):
        registry.add_version(_meta(name), _state(i))
    registry.path_of(registry.get_version("gone")).unlink()
    flipped = registry.path_of(registry.get_version("flipped"))
    flipped.write_bytes(flipped.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    _tamper(registry, "UPDATE adapter_versions SET file = '../../x' WHERE task_id = "
                      "(SELECT id FROM tasks WHERE name = 'tampered')")
    _tamper(registry, "UPDATE adapter_versions SET metrics = '[1]', train_time_s = 'slow', trainable_params = 'x' "
                      "WHERE task_id = (SELECT id FROM tasks WHERE name = 'mistyped')")
    (registry.adapter_dir / "ok" / ".x.safetensors.0123.tmp").write_bytes(b"half")
    orphan = registry.adapter_dir / "ok" / f"{'a' * 64}.safetensors"
    orphan.write_bytes(adapter_bytes(_state(9), _meta("ok")))
    (registry.adapter_dir / "README.txt").write_text("mine")
    url = registry.url

    out = _cli("doctor", "--registry", url, code=1)
    for line in ["missing file: gone@1", "hash mismatch: flipped@1", "bad row: tampered@1", "bad row: mistyped@1",
                 "temporary: ok/.x", f"orphan: ok/{'a' * 64}", "foreign: README.txt", "problem(s) to repair"]:
        assert line in out, out
    out = _cli("doctor", "--repair", "--registry", url)
    assert "repaired" in out and "foreign: README.txt" in out
    assert "mistyped@1: metrics must be a dict of numbers; rewritten from its file" in out
    assert "tampered@1: its file name '../../x' is not a plain name" in out and "folder; removed" in out
    out = _cli("doctor", "--registry", url)
    assert "foreign: README.txt" in out and "to repair" not in out
    reg = Registry(url)
    assert [t.name for t in reg.tasks()] == ["mistyped", "ok"]
    mistyped = reg.get_version("mistyped")  # the file is the record: the row is rebuilt from it
    assert (mistyped.metrics, mistyped.trainable_params, mistyped.train_time_s) == ({"test_top1": 0.75}, 130, None)
    assert (registry.adapter_dir / "README.txt").read_text() == "mine"  # not adaptkit's: left alone
    assert _files(reg) - {registry.adapter_dir / "README.txt"} == {reg.path_of(reg.get_version(n))
                                                                   for n in ("ok", "mistyped")}


@pytest.fixture
def read_only_later(tmp_path):
    """A folder and a function that makes it read-only: a tmpfs remounted read-only when root (chmod does not stop
    root), chmod 0555 otherwise."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        yield folder, lambda: (folder.chmod(0o555), (folder / "adapters").chmod(0o555))
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs to make a read-only folder (as root, chmod would not stop writes)")
    try:
        yield folder, lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_registry_reads_and_refuses_writes_in_one_line(read_only_later, tmp_path):
    folder, make_read_only = read_only_later
    reg = Registry(folder / "r.db")
    reg.add_version(_meta(), _state())
    exported = reg.export("demo", tmp_path / "demo.safetensors")
    reg.engine.dispose()  # no open database file, or a read-only remount is refused as busy
    make_read_only()
    assert "demo" in _cli("list", "--registry", folder / "r.db")
    for command in (["import", exported, "--task", "other"], ["remove", "demo", "--yes"]):
        out = _cli(*command, "--registry", folder / "r.db", code=1)
        assert "read-only" in out and out.count("\n") == 1, out
    assert [t.name for t in Registry(folder / "r.db").tasks()] == ["demo"]


def test_doctor_leaves_a_live_writers_files_even_at_min_age_0(registry, tmp_path):
    registry.add_version(_meta("ok"), _state(1))
    temp = registry.adapter_dir / "ok" / ".x.safetensors.0123456789ab.tmp"
    orphan = registry.adapter_dir / "ok" / f"{'b' * 64}.safetensors"
    with registry.storage.writing():  # a writer is between its first byte and its commit
        temp.write_bytes(b"half")
        orphan.write_bytes(adapter_bytes(_state(9), _meta("ok")))
        out = _cli("doctor", "--repair", "--min-age", "0", "--registry", registry.url)
        assert temp.exists() and orphan.exists(), out
        assert "a write is in flight (the adapter folder's lock is held), left alone" in " ".join(out.split())
    out = _cli("doctor", "--repair", "--min-age", "0", "--registry", registry.url)  # the writer died: now they go
    assert not temp.exists() and not orphan.exists(), out


def test_a_fresh_store_is_claimed_under_the_writers_lock(tmp_path):
    reg = Registry(tmp_path / "r.db")
    put, seen = reg.storage.put, []

    def watched_put(rel, data):
        if rel == OWNER_FILE:
            with reg.storage.sweeping() as alone:  # could a sweep run now, and take REGISTRY's temporary file?
                seen.append(alone)
        put(rel, data)

    reg.storage.put = watched_put
    reg.add_version(_meta("first"), _state(1))
    assert seen == [False] and (reg.adapter_dir / OWNER_FILE).is_file()


KILLED_EXPORT = """
import os, sys, time
from pathlib import Path
from adaptkit.tempfiles import hold, temp_beside
tmp = temp_beside(Path(sys.argv[1]))
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
hold(fd)
os.write(fd, b"half an adapter")
print(tmp, flush=True)
time.sleep(600)
"""


def test_kill_9_during_an_export_leaves_nothing_the_next_export_keeps(registry, tmp_path):
    registry.add_version(_meta("demo"), _state(1))
    dest = tmp_path / "out" / "demo.safetensors"
    dest.parent.mkdir()
    writers = [subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(dest)], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        dead, live = (Path(w.stdout.readline().strip()) for w in writers)
        os.kill(writers[0].pid, signal.SIGKILL)
        writers[0].wait(30)
        for tmp in (dead, live):
            os.utime(tmp, (1e9, 1e9))  # old enough to be anybody's
        registry.export("demo", dest)
        assert not dead.exists() and live.exists()  # the killed writer's goes; a live writer's stays
        assert dest.read_bytes() == registry.path_of(registry.get_version("demo")).read_bytes()
    finally:
        for w in writers:
            w.kill()
            w.wait(30)


@pytest.mark.parametrize("state, message", [({}, "holds no tensors"),
                                            ({"head.weight": [[1.0]]}, "maps 'head.weight' to a list, not a tensor"),
                                            ({"head.weight": None}, "maps 'head.weight' to a NoneType")])
def test_add_version_refuses_a_state_that_is_no_tensors(registry, state, message):
    with pytest.raises(ArtifactError, match=message):
        registry.add_version(_meta("demo"), state)
    assert registry.tasks() == [] and _files(registry) == set()


def test_a_registry_in_a_folder_that_does_not_exist_is_refused_and_nothing_is_made(tmp_path):
    reg = Registry(tmp_path / "no" / "such" / "r.db")
    with pytest.raises(RegistryError, match=r"registry folder .*no/such does not exist: create it or pass another"):
        reg.add_version(_meta("demo"), _state(1))
    assert list(tmp_path.iterdir()) == []  # no adapter folder made on the way


@pytest.mark.parametrize("version", ["9" * 5000, "9" * 20])  # past int()'s 4,300 digits; past a database integer
def test_a_version_number_too_long_is_one_line(registry, version):
    registry.add_version(_meta("demo"), _state(1))
    with pytest.raises(ConfigError, match=r"bad version in .*at most 9 digits"):
        registry.get_version(f"demo@{version}")
    out = _cli("show", f"demo@{version}", "--registry", registry.url, code=1)
    assert "at most 9 digits" in out and len(out) < 400

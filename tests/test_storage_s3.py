"""Adapter files in object storage: a registry whose adapters live on a real S3 API server (moto's server mode on
127.0.0.1, dummy credentials), with the guarantees it has on a local disk."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
import torch
from ports import free_port
from typer.testing import CliRunner

from adaptkit.artifacts import AdapterMeta, adapter_bytes
from adaptkit.errors import RegistryError
from adaptkit.registry import OWNER_FILE, Registry

PICO = "vit_pico_patch4_32"


@pytest.fixture(scope="session")
def s3_endpoint():
    """``http://127.0.0.1:PORT`` of a moto S3 server for the session; skipped if moto or s3fs is missing."""
    for module in ("moto", "flask", "s3fs", "boto3"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[dev,s3]'")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.skip("the moto S3 server did not start")
                time.sleep(0.1)
        else:
            pytest.skip("the moto S3 server did not answer within 15 s")
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> str:
    """A new bucket on the server, with dummy credentials in the environment; returns ``s3://NAME/adapters``."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    import boto3

    name = f"adaptkit-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}/adapters"


def _meta(pico, task: str = "demo") -> AdapterMeta:
    return AdapterMeta(task=task, classes=["a", "b"], method="linear", method_config={}, backbone=PICO,
                       backbone_weights="random", backbone_fingerprint=pico.fingerprint,
                       backbone_params=pico.num_params, backbone_dim=64, data_config=pico.data_config,
                       dataset="folder:x", metrics={"test_top1": 0.5})


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"head.weight": torch.randn(2, 64, generator=g), "head.bias": torch.randn(2, generator=g)}


def _objects(reg: Registry) -> dict[str, int]:
    """The adapter files in the store (not the store's REGISTRY owner file)."""
    return {f.rel: f.size for f in reg.storage.files() if f.rel != OWNER_FILE}


def test_a_registry_on_s3_predicts_as_a_local_one(pico, bucket, tmp_path, images):
    from adaptkit.inference import Predictor

    remote = Registry(tmp_path / "s3.db", adapter_dir=bucket)
    local = Registry(tmp_path / "local.db")
    for reg in (remote, local):
        reg.add_version(_meta(pico), _state(1))
    v = remote.get_version("demo")
    assert _objects(remote) == {v.file: v.bytes} and remote.location_of(v) == f"{bucket}/{v.file}"
    assert remote.adapter_dir is None
    with pytest.raises(RegistryError, match="not on a local disk"):
        remote.path_of(v)
    got = Predictor(remote, device="cpu").logits(images, "demo")
    assert torch.equal(got, Predictor(local, device="cpu").logits(images, "demo"))


def test_writes_are_idempotent_and_remove_deletes_the_object(pico, bucket, tmp_path):
    reg = Registry(tmp_path / "r.db", adapter_dir=bucket)
    v1 = reg.add_version(_meta(pico), _state(1))
    v2 = reg.add_version(_meta(pico), _state(1))  # the same bytes: one object, two versions
    assert v1.file == v2.file and len(_objects(reg)) == 1
    reg.remove("demo@1")
    assert len(_objects(reg)) == 1  # still used by demo@2
    dest = reg.export("demo", tmp_path)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == v2.sha256
    reg.remove("demo")
    assert _objects(reg) == {}


def test_doctor_on_s3_finds_and_cleans_crash_leftovers(pico, bucket, tmp_path):
    """What a writer killed between its PUT and its commit leaves: an object no row refers to."""
    from adaptkit.cli import app

    reg = Registry(tmp_path / "r.db", adapter_dir=bucket)
    reg.add_version(_meta(pico, "kept"), _state(1))
    orphan = f"demo/{'b' * 64}.safetensors"
    reg.storage.put(orphan, adapter_bytes(_state(2), _meta(pico)))
    assert reg.sweep() == []  # a young object may be a write in flight: no lock tells on S3
    gone = reg.add_version(_meta(pico, "gone"), _state(3))
    reg.storage.delete(gone.file)

    args = ["doctor", "--registry", str(tmp_path / "r.db"), "--adapters", bucket]
    out = CliRunner().invoke(app, args).output
    assert f"orphan: {orphan}" in out and "a write may be in flight" in out and "missing file: gone@1" in out
    result = CliRunner().invoke(app, [*args, "--repair", "--min-age", "0"])
    assert result.exit_code == 0, result.output
    assert set(_objects(reg)) == {reg.get_version("kept").file}
    assert [t.name for t in reg.tasks()] == ["kept"]
    assert CliRunner().invoke(app, args).exit_code == 0


def test_the_adapter_store_comes_from_the_environment(pico, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTKIT_ADAPTERS", bucket)
    reg = Registry(tmp_path / "r.db")
    reg.add_version(_meta(pico), _state())
    assert reg.storage.url == bucket and len(_objects(reg)) == 1


def test_a_missing_bucket_is_one_line_and_leaves_no_row(pico, bucket, tmp_path):
    reg = Registry(tmp_path / "r.db", adapter_dir="s3://no-such-bucket-adaptkit/adapters")
    with pytest.raises(RegistryError, match="no-such-bucket-adaptkit.*cannot write") as info:
        reg.add_version(_meta(pico), _state())
    assert "\n" not in str(info.value) and reg.tasks() == []


def test_the_cli_trains_lists_predicts_and_removes_with_an_s3_store(bucket, tmp_path, cifar_mini):
    from adaptkit.cli import app

    def run(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    here = ["--registry", tmp_path / "r.db", "--adapters", bucket]
    run("train", "--dataset", f"folder:{cifar_mini}", "--task", "t", "--backbone", PICO, "--no-pretrained",
        "--method", "linear", "--epochs", "1", "--limit-train", "32", "--limit-eval", "20", *here)
    reg = Registry(tmp_path / "r.db", adapter_dir=bucket)
    v = reg.get_version("t")
    assert _objects(reg) == {v.file: v.bytes} and not (tmp_path / "adapters").exists()
    assert "t " in run("list", *here)
    assert bucket in run("show", "t", *here)
    image = cifar_mini / "test" / "cat" / "0000.jpg"
    assert json.loads(run("predict", "--task", "t", image, "--json", *here))[0]["task"] == "t@1"
    assert "removed t@1" in run("remove", "t", "--yes", *here)
    assert _objects(reg) == {} and reg.tasks() == []


# -- a writer killed with kill -9 (as tests/test_integrity.py does on a local disk) ----------------------------------

# A writer that pauses at one point of a save, so that the test can kill it there. "mid-write": a file too large for
# one PUT goes up as a multipart upload (s3fs does so past 100 MB, e.g. a fully fine-tuned ViT-B; here with 5 MB
# parts); the writer stops with its parts on the server and the upload not completed.
WRITER = """
import functools, sys, time, torch
from adaptkit.artifacts import AdapterMeta
from adaptkit.registry import Registry

def pause(*args, **kwargs):
    print("READY", flush=True)
    time.sleep(300)

reg = Registry(sys.argv[1], adapter_dir=sys.argv[2])
point = sys.argv[3]
state = {{"head.weight": torch.ones(2, 64), "head.bias": torch.zeros(2)}}
if point == "mid-write":
    state["big"] = torch.ones(3_000_000)  # 12 MB: three parts
    fs = reg.storage.fs
    fs.pipe_file = functools.partial(fs.pipe_file, chunksize=5 * 2**20)
    call = fs._call_s3

    async def stop_before_completing(method, *args, **kwargs):
        if method == "complete_multipart_upload":
            pause()
        return await call(method, *args, **kwargs)

    fs._call_s3 = stop_before_completing
elif point == "uploaded, row not committed":
    reg._insert = pause
elif point == "row committed":
    reg.sweep = pause
reg.add_version(AdapterMeta(**{meta!r}), state)
"""
POINTS = ["mid-write", "uploaded, row not committed", "row committed"]


@pytest.fixture(params=["sqlite", "postgresql"])
def new_registry_url(request, tmp_path):
    """A function that gives the URL of a new empty registry on SQLite or on the test's PostgreSQL server."""
    if request.param == "sqlite":
        return lambda name: f"sqlite:///{tmp_path / name}.db"
    server = request.getfixturevalue("pg_server")
    return lambda name: server.url(server.create_database())


def _consistent(reg: Registry) -> None:
    """Every row's object present and matching its sha256; no object no row refers to; no unfinished upload."""
    rows = {v.file: v.sha256 for t in reg.tasks() for v in t.versions}
    assert set(_objects(reg)) == set(rows) and reg.storage.uploads() == []
    assert all(hashlib.sha256(reg.storage.get(rel)).hexdigest() == sha for rel, sha in rows.items())


def test_kill_9_during_a_write_to_s3_then_doctor_leaves_a_clean_registry(pico, bucket, new_registry_url):
    from dataclasses import asdict

    from adaptkit.registry.doctor import diagnose

    script = WRITER.format(meta=asdict(_meta(pico, "crash")))
    urls = {point: (new_registry_url(f"r{i}"), f"{bucket}/p{i}") for i, point in enumerate(POINTS)}
    procs = {}
    for point, (url, store) in urls.items():
        Registry(url, adapter_dir=store).add_version(_meta(pico, "before"), _state(1))
        procs[point] = subprocess.Popen([sys.executable, "-c", script, url, store, point], stdout=subprocess.PIPE,
                                        text=True)
    try:
        for point, proc in procs.items():
            assert proc.stdout.readline().strip() == "READY", point
            reg = Registry(*urls[point])
            objects, uploads = _objects(reg), [(u.rel, u.id) for u in reg.storage.uploads()]
            assert len(objects) == (1 if point == "mid-write" else 2), point
            assert [rel.split("/")[0] for rel, _ in uploads] == (["crash"] if point == "mid-write" else [])
            assert {t.name for t in reg.tasks()} == {"before"} | ({"crash"} if point == "row committed" else set())
            assert reg.sweep() == [] and not any(f.repaired for f in diagnose(reg, repair=True))  # maybe in flight
            assert (_objects(reg), [(u.rel, u.id) for u in reg.storage.uploads()]) == (objects, uploads)
    finally:
        for proc in procs.values():
            proc.kill()  # SIGKILL
            proc.wait(timeout=30)
    for point in POINTS:
        reg = Registry(*urls[point])
        for v in (v for t in reg.tasks() for v in t.versions):  # no row points at a missing or half object
            assert hashlib.sha256(reg.storage.get(v.file)).hexdigest() == v.sha256, point
        findings = diagnose(reg, repair=True, min_age_s=0)
        kinds = {"mid-write": ["upload"], "uploaded, row not committed": ["orphan"], "row committed": []}[point]
        assert [f.kind for f in findings] == kinds and all(f.repaired for f in findings), (point, findings)
        _consistent(reg)
        assert diagnose(reg) == []
        reg.add_version(_meta(pico, "after"), _state(2))  # the next writer
        _consistent(reg)
        crashed = {"crash"} if point == "row committed" else set()
        assert {t.name for t in reg.tasks()} == {"before", "after"} | crashed, point

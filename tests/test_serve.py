"""The Ray Serve deployment, served for real: a local Ray on 127.0.0.1, a registry of random-weight pico tasks, HTTP
requests against Serve's port. Predictions equal the Predictor's; bad requests get one-line 4xx answers and leave
the requests batched beside them alone; a version registered after start is served without a restart."""

from __future__ import annotations

import base64
import io
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from ports import free_port

from adaptkit.backbone import create_backbone
from adaptkit.inference import Predictor
from adaptkit.registry import Registry
from tests.conftest import PICO
from tests.test_serve_cache import random_images, register_random

httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

NAMES = ["alpha", "beta", "gamma"]
MAX_BYTES = 200_000


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    reg = Registry(root / "registry.db")
    backbone = create_backbone(PICO, pretrained=False)
    for i, name in enumerate(NAMES):
        register_random(reg, backbone, name, seed=i)
    broken = register_random(reg, backbone, "broken", seed=7)
    reg.path_of(broken).write_bytes(b"damaged")  # its row reads fine; loading it fails inside the batch
    try:
        ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False, logging_level="error")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    except Exception as exc:  # noqa: BLE001 - no Ray here: say why and skip
        ray.shutdown()
        pytest.skip(f"Ray cannot start here: {type(exc).__name__}: {exc}")
    from adaptkit.serving.ray_app import build_app

    common = {"registry": str(reg.url), "device": "cpu", "replica_cpus": "0.5", "threads": "1",
              "max_image_bytes": str(MAX_BYTES), "resolve_ttl_s": "0.2"}
    try:
        serve.run(build_app({**common, "max_batch_size": "16", "batch_wait_timeout_s": "0.3"}), name="main",
                  route_prefix="/")
        serve.run(build_app({**common, "cache_mb": "0", "batch_wait_timeout_s": "0.05"}), name="tiny",
                  route_prefix="/tiny")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield SimpleNamespace(client=client, reg=reg, backbone=backbone, imgs=random_images(6, seed=3))
    finally:
        serve.shutdown()
        ray.shutdown()


def matches(body: dict, want) -> bool:
    got = body["predictions"]
    return [p["label"] for p in got] == [p.label for p in want] and np.allclose(
        [p["prob"] for p in got], [p.prob for p in want], atol=1e-5)


def test_predict_by_task_equals_the_predictor_whichever_way_the_image_comes(served):
    plain = Predictor(served.reg, device="cpu")
    c, img = served.client, served.imgs[0]
    for name in NAMES:
        want = plain.predict([img], name, topk=3)[0]
        r = c.post(f"/predict/{name}", params={"topk": 3}, files={"file": ("x.png", png(img), "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["task"] == f"{name}@1" and matches(r.json(), want)
    raw = c.post("/predict/alpha@1?topk=3", content=png(img), headers={"content-type": "image/png"}).json()
    as_json = c.post("/predict/alpha?topk=3", json={"image": base64.b64encode(png(img)).decode()}).json()
    tiny = c.post("/tiny/predict/alpha?topk=3", content=png(img)).json()  # a cache of 0 MB
    want = plain.predict([img], "alpha", topk=3)[0]
    assert matches(raw, want) and matches(as_json, want) and matches(tiny, want)


def test_routed_predict_picks_the_predictors_task(served):
    want = Predictor(served.reg, device="cpu").predict_auto([served.imgs[1]], topk=2, tasks=NAMES)[0]
    r = served.client.post("/predict?topk=2", files={"file": ("x.png", png(served.imgs[1]), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == want.task and body["confidence"] == pytest.approx(want.confidence, abs=1e-5)
    assert matches(body, want.predictions)
    assert body["rejected"] == want.rejected and body["fit"] == pytest.approx(want.fit, abs=1e-5)


def test_tasks_health_and_openapi(served):
    c = served.client
    tasks = {t["task"]: t for t in c.get("/tasks").json()}
    assert set(tasks) == {*NAMES, "broken"} and tasks["alpha"]["default"] == "alpha@1"
    assert tasks["beta"]["classes"] == [f"beta{i}" for i in range(4)] and tasks["beta"]["backbone"] == PICO
    health = c.get("/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu" and "hit_rate" in health["cache"]
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/predict/{task}", "/predict", "/tasks", "/health"} <= set(paths)
    assert "multipart/form-data" in paths["/predict/{task}"]["post"]["requestBody"]["content"]
    assert c.get("/docs").status_code == 200


def test_bad_requests_get_one_line_reasons_and_spare_the_good_ones_batched_with_them(served):
    c, imgs = served.client, served.imgs
    plain = Predictor(served.reg, device="cpu")
    good = [(f"/predict/{NAMES[i % 3]}?topk=3", {"content": png(imgs[i])}) for i in range(6)]
    bad = [  # (path, request, expected status, words of the reason)
        ("/predict/alpha", {"content": b"plain text, no image"}, 400, "not an image"),
        ("/predict/alpha", {"content": png(Image.new("RGB", (2049, 4)))}, 413, "2048 a side"),
        ("/predict/alpha", {"content": b"\0" * (MAX_BYTES + 1)}, 413, "larger than"),
        ("/predict/nosuchtask", {"content": png(imgs[0])}, 404, "nosuchtask"),
        ("/predict/alpha@9", {"content": png(imgs[0])}, 404, "no version 9"),
        ("/predict/alpha", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
         "malformed JSON"),
        ("/predict/alpha", {"json": {"picture": "x"}}, 400, "no \"image\""),
        ("/predict/alpha", {"content": b"[" * 50_000 + b"]" * 50_000, "headers": {
            "content-type": "application/json"}}, 400, "malformed JSON"),  # nested deeper than json reads
        ("/predict/alpha@" + "9" * 5000, {"content": png(imgs[0])}, 400, "at most 9 digits"),
        ("/predict/alpha", {"files": {"other": (None, "text")}}, 400, "no file"),
        ("/predict/alpha", {"content": b"--x\r\nbroken", "headers": {
            "content-type": "multipart/form-data; boundary=x"}}, 400, "multipart"),
        ("/predict/alpha?topk=0", {"content": png(imgs[0])}, 422, "topk"),
        ("/predict/alpha?topk=abc", {"content": png(imgs[0])}, 422, "topk"),
        ("/predict/broken", {"content": png(imgs[0])}, 500, "changed since it was registered"),  # in the batch
        ("/predict?topk=-1", {"content": png(imgs[0])}, 422, "topk"),
    ]
    calls = good + [(p, kw) for p, kw, _, _ in bad]
    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(lambda call: c.post(call[0], **call[1]), calls))
    for i, r in enumerate(answers[:len(good)]):
        assert r.status_code == 200, r.text
        assert matches(r.json(), plain.predict([imgs[i]], NAMES[i % 3], topk=3)[0])
    assert max(r.json()["batch"] for r in answers[:len(good)]) > 1  # they did share passes
    for (path, _, status, words), r in zip(bad, answers[len(good):], strict=True):
        detail = r.json()["detail"]
        assert r.status_code == status and isinstance(detail, str) and "\n" not in detail, (path, r.text)
        assert words in detail, (path, detail)
        if status >= 500:  # the server's own fault: no server path in the answer (the server log has them)
            assert not re.search(r"/[^/\s]+/", detail), detail


def test_a_version_registered_after_start_is_served_without_restart(served):
    c, img = served.client, served.imgs[2]
    row = register_random(served.reg, served.backbone, "gamma", seed=11)
    want = Predictor(served.reg, device="cpu").predict([img], row.ref, topk=3)[0]
    deadline, body = time.monotonic() + 20, {}
    while time.monotonic() < deadline:
        body = c.post("/predict/gamma?topk=3", content=png(img)).json()
        if body.get("task") == "gamma@2":
            break
        time.sleep(0.1)
    assert body["task"] == "gamma@2" and matches(body, want)
    assert "gamma@2" in json.dumps(c.get("/tasks").json())


def test_a_tiny_cache_evicts_and_still_gives_the_same_answers(served):
    c, imgs = served.client, served.imgs
    plain = Predictor(served.reg, device="cpu")
    for _ in range(2):
        for i, name in enumerate(["alpha", "beta", "alpha@1", "beta"]):
            r = c.post(f"/tiny/predict/{name}?topk=4", content=png(imgs[i]))
            assert r.status_code == 200 and matches(r.json(), plain.predict([imgs[i]], name, topk=4)[0])
    cache = c.get("/tiny/health").json()["cache"]
    assert cache["evictions"] >= 7 and cache["resident"] <= 1 and cache["budget_mb"] == 0


def test_the_example_config_is_a_valid_serve_config_and_its_args_build():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from adaptkit.serving.ray_app import build_app

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "serve_config.yaml").read_text())
    app = ServeDeploySchema.model_validate(config).applications[0]
    assert app.import_path == "adaptkit.serving.ray_app:build_app"
    built = build_app(app.args)._bound_deployment
    assert built._deployment_config.autoscaling_config.max_replicas == 4
    assert built.ray_actor_options["num_gpus"] == 1


@pytest.mark.parametrize("args, words", [({"cache_mb": "lots"}, "cache_mb must be a number"),
                                         ({"max_batch_size": "0"}, "max_batch_size must be a whole number"),
                                         ({"autoscaling_config": "{nope"}, "autoscaling_config"),
                                         ({"cache": "1"}, "unknown setting(s) cache")])
def test_bad_build_arguments_say_which(args, words):
    from adaptkit.errors import ConfigError
    from adaptkit.serving.ray_app import build_app

    with pytest.raises(ConfigError) as exc:
        build_app(args)
    assert words in str(exc.value)


def test_serve_without_ray_says_which_extra_to_install(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from adaptkit.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)
    for name in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):  # serve sets them for Ray: undone after
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["serve", "--registry", str(tmp_path / "r.db")])
    assert result.exit_code == 1
    assert result.output.strip() == "error: serving needs the serve extra: pip install 'adaptkit[serve]'"


def test_requests_leave_no_info_line_each_in_the_replica_logs(served):
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    for i in range(3):
        assert served.client.post("/predict/alpha?topk=1", content=png(served.imgs[i])).status_code == 200
    time.sleep(1)  # the replica's log handler flushes
    replica_logs = sorted(logs.glob("replica_main_*.log"))
    assert replica_logs, sorted(p.name for p in logs.iterdir())
    lines = [line for p in replica_logs for line in p.read_text(errors="replace").splitlines()]
    assert not [line for line in lines if "/predict" in line and line.startswith("INFO")], lines[-5:]


def test_a_version_without_routing_statistics_leaves_routed_requests_answered(served):
    """Routed requests route over the tasks that have statistics and name the one left out, instead of a 409."""
    c, img = served.client, served.imgs[4]
    register_random(served.reg, served.backbone, "nostats", seed=13, routing=False)
    try:
        deadline, body = time.monotonic() + 20, {}
        while time.monotonic() < deadline:
            r = c.post("/predict?topk=2", content=png(img))
            assert r.status_code == 200, r.text
            body = r.json()
            if body["left_out"]:
                break
            time.sleep(0.1)
        assert body["left_out"] == ["nostats@1"] and body["task"] != "nostats@1" and len(body["predictions"]) == 2
    finally:
        served.reg.remove("nostats")

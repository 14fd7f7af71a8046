"""`adaptkit serve`'s Ray cluster, started for real in a child process: its control plane authenticates and, with
``--host 127.0.0.1``, every port its processes open listens on the loopback only; a Ray that cannot authenticate is
refused."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ports import free_port

from adaptkit.errors import ConfigError
from adaptkit.serving import ray_cluster

psutil = pytest.importorskip("psutil")
httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version, ok", [("2.40.0", False), ("2.51.1", False), ("2.52.0", True), ("2.60.0", True),
                                         ("3.0.0", True)])
def test_a_ray_that_cannot_authenticate_is_refused(version, ok):
    if ok:
        ray_cluster.check_version(version)
    else:
        with pytest.raises(ConfigError, match=r"cannot authenticate.*pip install -U 'ray\[serve\]>=2\.52'"):
            ray_cluster.check_version(version)


def test_the_serve_extra_pins_a_ray_that_authenticates():
    pin = re.search(r'serve = \["ray\[serve\]>=([\d.]+)"\]', (ROOT / "pyproject.toml").read_text())
    assert pin and tuple(int(p) for p in pin.group(1).split(".")[:2]) >= ray_cluster.MIN_RAY


def _listening(root: psutil.Process) -> set[tuple[str, str, int]]:
    pids = {p.pid: p.name() for p in root.children(recursive=True)}
    return {(pids[c.pid], c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def test_serve_on_the_loopback_keeps_rays_control_plane_there_and_authenticated(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in (ray_cluster.AUTH, ray_cluster.SINGLE_MACHINE)}
    env.update(HOME=str(tmp_path), PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "adaptkit.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--registry", str(tmp_path / "r.db"), "--device", "cpu"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, up = time.monotonic() + 240, False
        while time.monotonic() < deadline and proc.poll() is None and not up:
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                time.sleep(1)
        assert up, proc.stdout.read() if proc.poll() is not None else "not up in 240 s"
        listening = _listening(psutil.Process(proc.pid))
        assert any(p == port for _, _, p in listening), listening  # Serve's own port is among them
        assert len(listening) > 3, listening  # GCS, raylet, agents ... were seen
        open_doors = {s for s in listening if not ray_cluster.is_loopback(s[1].removeprefix("::ffff:"))}
        # Ray Serve binds its replicas' inter-deployment gRPC port to [::] whatever the node's address (2.60); that
        # server checks the cluster's token, like every other (the process title names the method it runs)
        assert all(name.startswith("ray::ServeReplica:adaptkit:") for name, _, _ in open_doors), open_doors
        ray_procs = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if p.name() in ("gcs_server", "raylet") or p.name().startswith("ray::ServeReplica")]
        modes = {(p.name(), p.environ().get(ray_cluster.AUTH)) for p in ray_procs}
        assert {"gcs_server", "raylet"} <= {name for name, _ in modes} and {m for _, m in modes} == {"token"}, modes
        assert (tmp_path / ".ray" / "auth_token").stat().st_size > 0  # the token Ray made for the cluster
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("host, auth, want_auth, loopback, note", [
    ("127.0.0.1", None, "token", "0", False),  # nothing chosen: authenticated, on the loopback
    ("::1", None, "token", "0", False),
    ("localhost", "token", "token", "0", False),
    ("0.0.0.0", None, "token", None, False),  # every interface asked for: Ray's node address stays
    ("127.0.0.1", "disabled", "disabled", "0", True),  # the user's choice is kept, and named
])
def test_prepare_turns_on_auth_and_the_loopback_unless_the_user_chose(monkeypatch, host, auth, want_auth, loopback,
                                                                       note):
    monkeypatch.delenv(ray_cluster.SINGLE_MACHINE, raising=False)
    if auth is None:
        monkeypatch.delenv(ray_cluster.AUTH, raising=False)
    else:
        monkeypatch.setenv(ray_cluster.AUTH, auth)
    notes = ray_cluster.prepare(host)
    assert os.environ.get(ray_cluster.AUTH) == want_auth and os.environ.get(ray_cluster.SINGLE_MACHINE) == loopback
    assert bool(notes) == note and all("does not authenticate" in n for n in notes)

"""Many users at once: 32 concurrent clients ask the page's ``/predict`` API, each for a random task among 10.

The same registry is served twice, one after the other, by ``python app/main.py`` in a subprocess on 127.0.0.1:
unbatched (``--max-batch 1``: one request per backbone pass) and batched (``--max-batch 32``: the queue gathers
concurrent requests into one ``Predictor.predict_mixed`` pass). Each client is a ``gradio_client.Client`` in its own
thread, sending requests back to back until its count or the time limit is reached. Reported: requests/s, p50 and
p95 latency, errors (an exception or an answer without labels), the mean number of requests per backbone pass, the
CPU time per request of the server (and the model's share: its batch's ``predict_mixed`` time over the batch) and of
the clients (this process), and the server's resident memory after a warm-up round (every client asks twice) and at
the end. The last lines give the bounds: CPU per request, and the model alone at batch 1 against a full batch.
"""

from __future__ import annotations

import os
import random
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import base_parser, median_time, parse, print_table, register_tasks

from adaptkit.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
CIFAR_MINI = ROOT.parent / "shared" / "data" / "cifar10-mini"
CLIENT_TIMEOUT_S = 120.0  # per HTTP call; a request that takes longer counts as an error
# gradio_client opens a new httpx client for each HTTP call of a request (upload, join, stream), and each builds an
# SSL context from certifi's CA bundle, even for http://127.0.0.1: 60-80 ms of CPU per request, 4x what the server
# spends, on the cores the server shares. One context, built once and handed to every client, removes that.
SSL_CONTEXT = ssl.create_default_context()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used, all its threads together, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(db: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GRADIO_ANALYTICS_ENABLED": "False"}
    # -c with the repository root as the working directory: this checkout's app, not an installed one
    proc = subprocess.Popen([sys.executable, "-c", "from adaptkit_app.main import main; main()", "--registry", str(db),
                             "--host",
                             "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}/"
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the page exited with status {proc.returncode}") from None
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the page did not start within 120 s")


def client_loop(client: Any, tasks: list[str], images: list[str], requests: int, seconds: float, seed: int,
                out: list[tuple[float, bool, int, float]], start: threading.Barrier) -> None:
    from gradio_client import handle_file

    rng = random.Random(seed)
    start.wait()
    deadline = time.monotonic() + seconds
    for _ in range(requests):
        if time.monotonic() > deadline:
            break
        tick = time.perf_counter()
        try:
            labels, note = client.predict(handle_file(rng.choice(images)), rng.choice(tasks), 3, api_name="/predict")
            ok, batch = bool(labels and labels.get("label")), re.search(r"in a batch of (\d+)", note)
            took = re.search(r"predicted in \*\*([\d.]+) ms", note)
        except Exception:  # noqa: BLE001 - every failure counts as an error
            ok, batch, took = False, None, None
        size = int(batch.group(1)) if batch else 1
        # the model's share of this request: its batch's predict_mixed time over the batch's requests
        out.append((time.perf_counter() - tick, ok, size, float(took.group(1)) / size if took else 0.0))


def connect(url: str, clients: int) -> list[Any]:
    """``clients`` clients, connected one by one: one Gradio session each, kept for every round."""
    from gradio_client import Client

    return [Client(url, verbose=False, ssl_verify=SSL_CONTEXT, httpx_kwargs={"timeout": CLIENT_TIMEOUT_S})
            for _ in range(clients)]


def run(conns: list[Any], server_pid: int, tasks: list[str], images: list[str], requests: int,
        seconds: float) -> dict:
    """Every client sends up to ``requests`` requests within ``seconds``; with the CPU time the server and the
    clients (this process) used per request, and the model's share of it."""
    clients = len(conns)
    results: list[tuple[float, bool, int, float]] = []
    start = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=client_loop, args=(c, tasks, images, requests, seconds, i, results, start))
               for i, c in enumerate(conns)]
    for t in threads:
        t.start()
    server_cpu, client_cpu = cpu_s(server_pid), time.process_time()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join(timeout=seconds + 2 * CLIENT_TIMEOUT_S)
    wall = time.perf_counter() - began
    server_cpu, client_cpu = cpu_s(server_pid) - server_cpu, time.process_time() - client_cpu
    n = len(results)
    lat = sorted(r[0] for r in results)
    return {"requests": n, "errors": sum(not r[1] for r in results), "rps": n / wall,
            "p50": statistics.median(lat) * 1000, "p95": lat[int(0.95 * (n - 1))] * 1000,
            "batch": statistics.mean(r[2] for r in results), "model_ms": sum(r[3] for r in results) / n,
            "server_ms": server_cpu / n * 1000, "client_ms": client_cpu / n * 1000}


def model_ceiling(db: Path, tasks: list[str], images: list[str], batch: int, repeats: int = 15) -> tuple[float, float]:
    """Milliseconds per image of ``predict_mixed`` alone, one image at a time and ``batch`` at once (medians, the two
    taken in turn so that a change of load hits both): the most that batching can win on this machine, before any
    HTTP or queue cost."""
    from adaptkit.data import open_image
    from adaptkit.inference import Predictor

    predictor = Predictor(Registry(db))  # the server's device: CUDA where there is one
    imgs = [open_image(images[i % len(images)]) for i in range(batch)]
    refs = [tasks[i % len(tasks)] for i in range(batch)]
    predictor.predict_mixed(imgs, refs)  # load everything
    one, many = [], []
    for _ in range(repeats):
        one.append(median_time(lambda: [predictor.predict_mixed([im], [r]) for im, r in zip(imgs, refs, strict=True)],
                               1, warmup=0))
        many.append(median_time(lambda: predictor.predict_mixed(imgs, refs), 1, warmup=0))
    return statistics.median(one) / batch * 1000, statistics.median(many) / batch * 1000


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--requests", type=int, default=40, help="at most this many requests per client")
    parser.add_argument("--seconds", type=float, default=60.0, help="and at most this long per mode")
    parser.add_argument("--backbone", default="vit_cifar_tiny_patch4_32")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="measured rounds per mode, with the same clients: "
                        "the table shows the first, the server's memory is printed after each")
    args = parse(parser)
    if args.quick:
        args.clients, args.requests, args.seconds = 8, 10, 20.0
    images = [str(p) for p in sorted((CIFAR_MINI / "test").glob("*/*.jpg"))[:: 7]]
    if not images:
        raise SystemExit(f"{CIFAR_MINI} has no test images")
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "registry.db"
        names = [f"t{i}" for i in range(args.tasks)]
        register_tasks(Registry(db), args.backbone, [(n, "adapter", {"rank": 16}, 10) for n in names])
        torch.set_num_threads(args.threads or 1)  # as the server runs
        alone, together = model_ceiling(db, names, images, args.max_batch)
        rows, figures, memory = [], {}, []
        for label, max_batch in (("unbatched", 1), (f"batched (max {args.max_batch})", args.max_batch)):
            proc, url = start_server(db, max_batch, args.threads or 1)
            try:
                # load the backbone and every adapter, and reach the memory a full batch needs
                conns = connect(url, args.clients)
                warm = run(conns, proc.pid, names, images, 2, 60)
                r = None
                rss = [rss_mb(proc.pid)]
                for _ in range(args.rounds):
                    result = run(conns, proc.pid, names, images, args.requests, args.seconds)
                    r = r or result
                    rss.append(rss_mb(proc.pid))
                before, after = rss[0], rss[1]
                memory.append(f"{label}: " + " -> ".join(f"{m:.0f}" for m in rss))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            figures[label] = r
            rows.append([label, r["requests"], f"{r['rps']:.1f}", f"{r['p50']:.0f}", f"{r['p95']:.0f}",
                         r["errors"] + warm["errors"], f"{r['batch']:.1f}", f"{r['server_ms']:.0f}",
                         f"{r['model_ms']:.0f}", f"{r['client_ms']:.0f}", f"{before:.0f} -> {after:.0f}"])
        print(f"{args.clients} clients, {args.tasks} tasks ({args.backbone}, adapter r=16), up to {args.requests} "
              f"requests each or {args.seconds:.0f} s; server with {args.threads or 1} torch thread(s)")
        print_table(["mode", "requests", "req/s", "p50 ms", "p95 ms", "errors", "mean batch", "server CPU ms/req",
                     "model ms/req", "client CPU ms/req", "server RSS MB"], rows)
        if args.rounds > 1:
            print(f"server RSS MB after the warm-up and each of {args.rounds} rounds:", "; ".join(memory))
        unb, bat = figures.values()
        print(f"\nbatched/unbatched: {bat['rps'] / unb['rps']:.2f}x requests/s, p50 {bat['p50'] / unb['p50']:.2f}x")
        cpu = [r["server_ms"] + r["client_ms"] for r in (unb, bat)]
        print(f"CPU per request, server + clients: {cpu[0]:.1f} ms unbatched, {cpu[1]:.1f} ms batched: "
              f"{cpu[0] / cpu[1]:.2f}x, the bound while the CPU is what runs out")
        print(f"the model alone (predict_mixed, no HTTP): {alone:.1f} ms per image one at a time, {together:.1f} ms "
              f"in batches of {args.max_batch}: at most {alone / together:.2f}x from batching on this machine")


if __name__ == "__main__":
    main()

"""Serving 1 to 1000 tasks behind one backbone: mixed batches and the adapter cache against one pass per request and a
PEFT-style loop (one pass per task of the batch), with requests spread uniformly or Zipf-skewed over the tasks.

In-process rows run a replica's own code path without HTTP: ``AdapterCache`` over a ``Predictor`` with a byte budget
(``--cache-mb``), fed a bounded stream of requests for random-weight adapter tasks. A batch is ``--batch`` requests
that arrive together (that many clients each waiting for its answer); while it computes, the files of the next
batch's tasks are read in the background (``prefetch``), as the Ray deployment does for the requests queued behind
the running batch. Modes, each with its own predictor and cache, timed in turn (round-robin, ``--rounds``):

- ``batched``: one ``predict_mixed`` pass per batch, every task of it at once;
- ``batched, no prefetch``: the same with every cold task read while the batch waits;
- ``unbatched``: one pass per request, in arrival order;
- ``PEFT-style loop``: per batch, one pass per task over its own sub-batch (``set_adapter(task); model(x[task])``).

Before the timed rounds each mode is warmed as a running server is: every task asked for once, then a stream of
other requests of the same spread (so with a budget that holds every adapter, the timed stream hits the cache).
A request's latency runs from its batch's arrival to the moment its answer is ready (for the loops: after the passes
before it). Reported: requests/s, p50/p99 latency, the cache's hit rate and reads that stalled a batch, the resident
adapters' MiB and the process's RSS. The last rows go end to end over HTTP: a local Ray Serve (``build_app``) with
the 100-task registry, ``--clients`` threads on 127.0.0.1 posting PNGs, batched against ``max_batch_size=1``.
"""

from __future__ import annotations

import io
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import base_parser, machine_line, parse, print_table, register_tasks
from PIL import Image

from adaptkit.inference import Predictor
from adaptkit.registry import Registry
from adaptkit.serving.cache import AdapterCache


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream(tasks: int, requests: int, dist: str, seed: int = 0) -> list[str]:
    """Task names of ``requests`` requests: uniform over ``tasks``, or Zipf with exponent 1.1 (task i has weight
    1 / (i+1)^1.1, in a shuffled order so that the popular tasks are not the first registered)."""
    rng = random.Random(seed)
    names = [f"t{i}" for i in range(tasks)]
    if dist == "uniform":
        return [rng.choice(names) for _ in range(requests)]
    rng.shuffle(names)
    weights = [1 / (i + 1) ** 1.1 for i in range(tasks)]
    return rng.choices(names, weights, k=requests)


def serve_stream(mode: str, cache: AdapterCache, images: list, refs: list[str], batch: int) -> list[float]:
    """Run the stream through ``mode``; the latency of each request in seconds."""
    lat: list[float] = []
    batches = [refs[i:i + batch] for i in range(0, len(refs), batch)]
    for b, rs in enumerate(batches):
        if b + 1 < len(batches) and mode != "batched, no prefetch":
            cache.prefetch(batches[b + 1])
        imgs = [images[(b * batch + i) % len(images)] for i in range(len(rs))]
        start = time.perf_counter()
        if mode.startswith("batched"):
            cache.predict_mixed(imgs, rs, topk=3)
            lat += [time.perf_counter() - start] * len(rs)
        elif mode == "unbatched":
            for img, r in zip(imgs, rs, strict=True):
                cache.predict_mixed([img], [r], topk=3)
                lat.append(time.perf_counter() - start)
        else:
            with cache.lock:  # the loop's sub-batches finish one after another: time each task's requests
                pinned: set[str] = set()
                keys = [cache.use(r, pinned) for r in rs]
                cache.evict(pinned)
                groups: dict[str, list[int]] = {}
                for i, k in enumerate(keys):
                    groups.setdefault(k, []).append(i)
                for k, idx in groups.items():
                    cache.predictor.predict([imgs[i] for i in idx], k, topk=3)
                    lat += [time.perf_counter() - start] * len(idx)
    return lat


MODES = ["batched", "batched, no prefetch", "unbatched", "PEFT-style loop"]


def slow_store(reg: Registry, seconds: float) -> Registry:
    """``reg`` whose adapter reads each wait ``seconds`` first (sleeping, as a network read does): an object store."""
    if seconds > 0:
        read = reg.load_version

        def load_version(*a, **kw):
            time.sleep(seconds)
            return read(*a, **kw)

        reg.load_version = load_version  # type: ignore[method-assign]
    return reg


def measure(db: Path, tasks: int, dist: str, args, images: list) -> list[list]:
    refs = stream(tasks, args.requests, dist, seed=tasks)
    warm = [f"t{i}" for i in range(tasks)] + stream(tasks, args.requests, dist, seed=tasks + 1)
    caches = {m: AdapterCache(Predictor(slow_store(Registry(db), args.store_ms / 1000), device=args.device),
                              cache_mb=args.cache_mb,
                              prefetch=m != "batched, no prefetch", resolve_ttl_s=60) for m in MODES}
    for m, cache in caches.items():  # warm-up: every task asked for once, then a stream of other requests (the
        serve_stream(m, cache, images, warm, args.batch)  # cache holds what a running server's would)
    base = {m: cache.stats() for m, cache in caches.items()}
    runs: dict[str, list[tuple[float, list[float]]]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for m, cache in caches.items():
            start = time.perf_counter()
            lat = serve_stream(m, cache, images, refs, args.batch)
            runs[m].append((time.perf_counter() - start, lat))
    rows = []
    for m, cache in caches.items():
        wall, lat = sorted(runs[m], key=lambda r: r[0])[len(runs[m]) // 2]  # the median run
        s, b = cache.stats(), base[m]
        asked = (s.hits + s.misses) - (b.hits + b.misses)
        lat = sorted(lat)
        rows.append([tasks, dist, m, f"{len(refs) / wall:.0f}", f"{statistics.median(lat) * 1000:.0f}",
                     f"{lat[int(0.99 * (len(lat) - 1))] * 1000:.0f}", f"{(s.hits - b.hits) / max(asked, 1):.0%}",
                     s.cold_reads - b.cold_reads, f"{s.resident_mb:.1f}", f"{rss_mb():.0f}"])
        cache.close()
    return rows


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def http_rows(db: Path, tasks: int, args, images: list) -> list[list]:
    """End to end: Ray Serve on 127.0.0.1, ``--clients`` threads posting images for Zipf-skewed tasks."""
    import httpx
    import ray
    from ray import serve

    from adaptkit.serving.ray_app import build_app

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False, logging_level="error")
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    bodies = [png(im) for im in images]
    rows = []
    try:
        for label, max_batch in ((f"HTTP, batched (max {args.batch})", args.batch), ("HTTP, max_batch_size=1", 1)):
            serve.run(build_app({"registry": str(db), "device": args.device, "cache_mb": args.cache_mb,
                                 "max_batch_size": max_batch, "batch_wait_timeout_s": 0.005, "threads": 1,
                                 "replica_cpus": 1, "max_ongoing_requests": 2 * args.clients}),
                      name="bench", route_prefix="/")
            base = f"http://127.0.0.1:{port}"
            refs = stream(tasks, args.clients * args.http_requests, "zipf", seed=7)
            for warm in (True, False):
                lat, failures, sizes = [], [0], []

                def client(k: int, warm: bool = warm, lat: list = lat, failures: list = failures,
                           sizes: list = sizes, base: str = base, refs: list = refs) -> None:
                    with httpx.Client(base_url=base, timeout=120) as c:
                        for j in range(2 if warm else args.http_requests):
                            ref = refs[k * args.http_requests + j]
                            tick = time.perf_counter()
                            r = c.post(f"/predict/{ref}?topk=3", content=bodies[j % len(bodies)])
                            lat.append(time.perf_counter() - tick)
                            if r.status_code != 200:
                                failures[0] += 1
                            else:
                                sizes.append(r.json()["batch"])

                threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - start
            cache = httpx.get(f"{base}/health").json()["cache"]
            lat.sort()
            rows.append([tasks, "zipf", label, f"{len(lat) / wall:.0f}", f"{statistics.median(lat) * 1000:.0f}",
                         f"{lat[int(0.99 * (len(lat) - 1))] * 1000:.0f}", f"{cache['hit_rate']:.0%}",
                         cache["cold_reads"], f"{cache['resident_mb']:.1f}",
                         f"mean batch {statistics.mean(sizes):.1f}, {failures[0]} errors"])
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=None, help="[default: vit_cifar_tiny_patch4_32; quick: "
                        "vit_pico_patch4_32]")
    parser.add_argument("--tasks", type=int, nargs="+", default=None, help="[default: 1 10 100 1000; quick: 1 10 100]")
    parser.add_argument("--requests", type=int, default=None, help="requests per mode and round [default: 256]")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cache-mb", type=float, default=16.0, help="the adapter budget per predictor")
    parser.add_argument("--rounds", type=int, default=None, help="timed runs of each mode, in turn [default: 2]")
    parser.add_argument("--store-ms", type=float, default=0.0, help="in-process rows: add this wait to every "
                        "adapter read, as an object store's round trip would (default: the local disk as it is)")
    parser.add_argument("--clients", type=int, default=32, help="HTTP clients")
    parser.add_argument("--http-requests", type=int, default=None, help="requests per HTTP client [default: 8]")
    parser.add_argument("--no-http", action="store_true", help="skip the end-to-end Ray Serve rows")
    args = parse(parser)
    args.backbone = args.backbone or ("vit_pico_patch4_32" if args.quick else "vit_cifar_tiny_patch4_32")
    args.tasks = args.tasks or ([1, 10, 100] if args.quick else [1, 10, 100, 1000])
    args.requests = args.requests or (128 if args.quick else 256)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.http_requests = args.http_requests or (4 if args.quick else 8)
    if args.threads is None:
        import torch

        torch.set_num_threads(1)  # as one replica of the server runs
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(64)]
    rows, http = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.tasks:
            db = Path(tmp) / f"r{n}" / "registry.db"
            db.parent.mkdir()
            tick = time.perf_counter()
            register_tasks(Registry(db), args.backbone, [(f"t{i}", "adapter", {"rank": 16}, 10) for i in range(n)])
            print(f"{n} tasks registered in {time.perf_counter() - tick:.1f} s", file=sys.stderr)
            for dist in ("uniform", "zipf"):
                rows += measure(db, n, dist, args, images)
                print(f"  {n} tasks, {dist}: done", file=sys.stderr)
            if not args.no_http and n == max((t for t in args.tasks if t <= 100), default=max(args.tasks)):
                http = http_rows(db, n, args, images)
    print(f"{args.backbone}, adapter r=16, 10 classes; batch {args.batch}; cache {args.cache_mb:g} MiB per predictor; "
          f"{args.requests} requests per mode, median of {args.rounds} round(s); adapter reads +{args.store_ms:g} ms; "
          f"{machine_line()}")
    print_table(["tasks", "requests", "mode", "req/s", "p50 ms", "p99 ms", "cache hits", "stalled reads",
                 "adapters MiB", "RSS MB"], rows + http)
    _ratios(rows)


def _ratios(rows: list[list]) -> None:
    by = {(r[0], r[1], r[2]): float(r[3]) for r in rows}
    for (n, dist, mode), rps in by.items():
        if mode == "batched":
            others = ", ".join(f"{rps / by[(n, dist, m)]:.2f}x {m}" for m in MODES[1:] if (n, dist, m) in by)
            print(f"{n} tasks, {dist}: batched requests/s = {others}")


if __name__ == "__main__":
    main()

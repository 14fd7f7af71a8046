"""`adaptkit serve`: every task over HTTP, behind one backbone per replica, on a local Ray Serve."""

from __future__ import annotations

import os
import socket
import time
from typing import Annotated

import typer

from adaptkit.cli.common import AdaptersOpt, DeviceOpt, RegistryOpt, app, echo, err, friendly, registry_of

SERVE_EXTRA = "serving needs the serve extra: pip install 'adaptkit[serve]'"


def _check_port_free(host: str, port: int) -> None:
    from adaptkit.errors import ConfigError

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port or --host") \
                from None


@app.command()
@friendly
def serve(
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port")] = 8000,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
    cache_mb: Annotated[float, typer.Option(metavar="MB", help="Adapters kept attached per replica, in MiB "
                                            "(least recently used ones go)")] = 256.0,
    max_batch: Annotated[int, typer.Option(metavar="N", help="Requests, for any mix of tasks, per backbone "
                                           "pass")] = 32,
    batch_wait_ms: Annotated[float, typer.Option(metavar="MS", help="How long a batch waits to fill")] = 10.0,
    replicas: Annotated[int, typer.Option(metavar="N", help="Replicas, each with its own backbone")] = 1,
    device: DeviceOpt = None,
) -> None:
    """Serve every task over HTTP (Ray Serve): POST /predict/TASK, POST /predict (routed), GET /tasks, /health.

    Concurrent requests for any mix of tasks share one backbone pass; the API is described at /docs. Ctrl+C stops.
    """
    from adaptkit.checks import check_float, check_int
    from adaptkit.errors import ConfigError

    check_int("--port", port, 1, 65535)
    check_int("--max-batch", max_batch, 1)
    check_int("--replicas", replicas, 1)
    check_float("--cache-mb", cache_mb, 0)
    check_float("--batch-wait-ms", batch_wait_ms, 0)
    from importlib.metadata import PackageNotFoundError, version

    from adaptkit.serving import ray_cluster

    try:
        ray_cluster.check_version(version("ray"))
    except PackageNotFoundError:
        raise ConfigError(SERVE_EXTRA) from None
    for note in ray_cluster.prepare(host):  # before Ray is imported: it reads these settings then
        err.print(f"note: {note}")
    try:
        import ray
        from ray import serve as ray_serve
    except ImportError:
        raise ConfigError(SERVE_EXTRA) from None
    reg = registry_of(registry, adapters)
    if not any(t.default is not None for t in reg.tasks()):
        err.print(f"note: {reg.location} has no tasks yet; they are served as soon as they are trained")
    _check_port_free(host, port)
    from adaptkit.serving.ray_app import build_app

    cpus = os.cpu_count() or 1
    args = {"registry": reg.url, "adapters": reg.storage.url, "device": device, "cache_mb": cache_mb,
            "max_batch_size": max_batch, "batch_wait_timeout_s": batch_wait_ms / 1000, "num_replicas": replicas,
            "threads": max(1, cpus // replicas)}
    ray.init(address="local", num_cpus=max(cpus, replicas), include_dashboard=False, logging_level="warning",
             configure_logging=False)
    if ray_cluster.is_loopback(host) and not ray_cluster.is_loopback(ray.util.get_node_ip_address()):
        err.print(f"note: Ray's control plane listens on {ray.util.get_node_ip_address()}, not only on {host}")
    try:
        ray_serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        ray_serve.run(build_app(args), name="adaptkit", route_prefix="/")
        echo(f"adaptkit serving {reg.location} on http://{host}:{port} (API: http://{host}:{port}/docs; "
             "Ctrl+C to stop)")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        echo("stopped")
    finally:
        ray_serve.shutdown()
        ray.shutdown()

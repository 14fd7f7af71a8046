"""The Ray Serve deployment: each replica holds one backbone; concurrent requests for any mix of tasks share a pass.

Start it with ``adaptkit serve``, ``serve run adaptkit.serving.ray_app:build_app registry=PATH adapters=PATH`` or
``serve deploy examples/serve_config.yaml``. Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``):

- ``POST /predict/{task}?topk=5``: the top-k labels of an image under ``task`` or ``task@N``; the image is a
  multipart field (``file``), the raw body, or JSON ``{"image": "<base64>"}``.
- ``POST /predict?topk=5``: the same with no task named: the router picks it (``Predictor.predict_auto``); the
  answer says ``rejected: true`` when the image fits none of the tasks (``fit``: see
  ``adaptkit.inference.routing_stats``), and ``left_out`` names the tasks not routed over (no routing statistics).
- ``GET /tasks``: every task and its default version; ``GET /health``: the device and the adapter cache's counters.

Every request is checked before it joins a batch (its image decoded and bounded, its task resolved against the
shared registry), so a bad one is answered at once with a 4xx and a one-line ``{"detail": "..."}`` and never meets
the others; inside a batch (:mod:`adaptkit.serving.cache`) an adapter that cannot be loaded fails its own requests
only. While a batch computes, the files of the tasks queued for the next one are read in the background.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request, Query) at run time.
import asyncio
import base64
import binascii
import io
import json
import logging
import os
import re
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, ImageOps, UnidentifiedImageError
from ray import serve
from ray.serve import Application
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from adaptkit.checks import check_float, check_int
from adaptkit.data import MAX_SIDE, to_rgb
from adaptkit.errors import AdaptkitError, ConfigError, ImageError, NotFoundError, RegistryError, RoutingError

__all__ = ["AdaptkitServer", "DEFAULTS", "api", "build_app", "settings"]

DEFAULTS: dict[str, Any] = {
    "registry": None,  # path or SQLAlchemy URL [default: $ADAPTKIT_REGISTRY or ./registry.db]
    "adapters": None,  # folder or s3://bucket/prefix [default: beside the registry]
    "device": None,  # cuda, cpu ... [default: cuda if available]
    "cache_mb": 256.0,  # adapters kept attached per replica
    "max_batch_size": 32,  # requests per backbone pass
    "batch_wait_timeout_s": 0.01,  # how long a batch waits to fill
    "num_replicas": 1,  # ignored when autoscaling_config is given
    "autoscaling_config": None,  # Ray Serve's: min_replicas, max_replicas, target_ongoing_requests ...
    "max_ongoing_requests": None,  # per replica [default: 2 x max_batch_size, at least 64]
    "replica_cpus": 1.0,
    "replica_gpus": 0.0,
    "threads": None,  # torch threads per replica [default: torch's]
    "max_image_bytes": 16 * 2 ** 20,
    "resolve_ttl_s": 1.0,  # a new default version is seen within this time
}
_UPLOAD_HELP = "the image: a multipart field `file`, the raw body (image/*), or JSON {\"image\": \"<base64>\"}"
_BODY = {"requestBody": {"required": True, "description": _UPLOAD_HELP, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string",
                                                                                 "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": {"type": "object", "properties": {"image": {"type": "string",
                                                                               "format": "byte"}}}}}}}
_log = logging.getLogger(__name__)
_INLINE_BYTES = 64 * 1024  # images up to this size are decoded on the event loop
TopK = Query(5, ge=1, le=1000, description="how many labels to return")

api = FastAPI(title="adaptkit", summary="One frozen ViT, a small adapter per task: image classification over HTTP.")


@api.exception_handler(RequestValidationError)
async def _one_line(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
    return JSONResponse({"detail": f"{where}: {first['msg']}" if where else first["msg"]}, status_code=422)


def _http(exc: Exception) -> HTTPException:
    """An error as an HTTP answer: the client's fault 4xx, the server's 5xx; always one line."""
    if isinstance(exc, HTTPException):
        return exc
    text = " ".join(str(exc).split())
    if isinstance(exc, NotFoundError):
        return HTTPException(404, text)
    if isinstance(exc, (ImageError, ConfigError)):
        return HTTPException(400, text)
    if isinstance(exc, RoutingError):
        return HTTPException(409, text)
    if isinstance(exc, (RegistryError, AdaptkitError)):  # the server's fault: its paths stay in its log
        _log.warning("request failed: %s", text)
        return HTTPException(503 if isinstance(exc, RegistryError) else 500, _no_paths(text))
    return HTTPException(500, f"unexpected {type(exc).__name__}; the server log has the details")


_PATH = re.compile(r"(?<![\w:/])(?:/[^\s/'\"]+)+/([^\s/'\"]+)")  # an absolute path; its last part is kept


def _no_paths(text: str) -> str:
    """``text`` with every absolute path on the server cut to its file name (the server's log has them whole)."""
    return _PATH.sub(r"\1", text)


def decode_image(data: bytes) -> Image.Image:
    """Request bytes -> an RGB image (EXIF rotation applied); refuses what is not an image or is too large."""
    if not data:
        raise HTTPException(400, f"no image in the request: send {_UPLOAD_HELP}")
    try:
        img = Image.open(io.BytesIO(data))
        if max(img.size) > MAX_SIDE:
            raise HTTPException(413, f"the image is {img.width}x{img.height} pixels; this server takes at most "
                                     f"{MAX_SIDE} a side: downscale it")
        img.load()
    except UnidentifiedImageError:
        raise HTTPException(400, "the upload is not an image: send a PNG, JPEG, WebP, BMP, GIF or TIFF") from None
    except Image.DecompressionBombError:
        raise HTTPException(413, "the image has too many pixels to decode safely: downscale it") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise HTTPException(400, f"the image could not be decoded; it looks truncated or corrupt ({exc})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to refuse the pixels
        pass
    return to_rgb(img)


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The image bytes of a request, whichever way they came; more than ``max_bytes`` is a 413."""
    too_big = HTTPException(413, f"the request is larger than this server's {max_bytes:,} bytes: send a smaller image")
    if int(request.headers.get("content-length") or 0) > max_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    body = b"".join(chunks)
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind == "multipart/form-data":
        async def stream():
            yield body
        try:
            form = await MultiPartParser(request.headers, stream(), max_files=4, max_fields=16).parse()
        except (MultiPartException, ValueError, KeyError) as exc:
            raise HTTPException(400, f"malformed multipart form: {exc}") from None
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise HTTPException(400, "the form has no file: send the image as the multipart field `file`")
        return await (form.get("file") if isinstance(form.get("file"), UploadFile) else files[0]).read()
    if kind == "application/json" or (kind.endswith("+json")):
        try:
            value = json.loads(body)["image"]
            return base64.b64decode(value, validate=True)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # Recursion: nested too deep to read
            raise HTTPException(400, "malformed JSON: send {\"image\": \"<base64>\"}") from None
        except (KeyError, TypeError):
            raise HTTPException(400, "the JSON has no \"image\" field: send {\"image\": \"<base64>\"}") from None
        except (binascii.Error, ValueError):
            raise HTTPException(400, "the JSON's \"image\" is not base64") from None
    return body


def _labels(preds: list) -> list[dict]:
    return [asdict(p) for p in preds]


@serve.deployment(name="adaptkit", ray_actor_options={"num_cpus": 1},
                  logging_config={"log_level": "WARNING"})  # no INFO line per request; a config may ask for it
@serve.ingress(api)
class AdaptkitServer:
    """One replica: a backbone, an :class:`~adaptkit.serving.cache.AdapterCache` and two batch queues (named tasks,
    routed requests). ``config`` is :func:`settings`' output."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        from adaptkit.inference import Predictor
        from adaptkit.registry import Registry
        from adaptkit.serving.cache import AdapterCache

        if config["threads"]:
            torch.set_num_threads(config["threads"])
        registry = Registry(config["registry"], adapter_dir=config["adapters"])
        self.cache = AdapterCache(Predictor(registry, device=config["device"]), cache_mb=config["cache_mb"],
                                  resolve_ttl_s=config["resolve_ttl_s"])
        self.max_bytes = config["max_image_bytes"]
        for queue in (self._named, self._routed):
            queue.set_max_batch_size(config["max_batch_size"])
            queue.set_batch_wait_timeout_s(config["batch_wait_timeout_s"])
        first = next((t.name for t in registry.tasks() if t.default is not None and not t.broken), None)
        try:  # the backbone loads now, not in the first request
            if first is not None:
                self.cache.use(first)
        except AdaptkitError as exc:
            _log.warning("could not load %s at start: %s", first, exc)

    async def _image(self, request: Request) -> Image.Image:
        data = await read_upload(request, self.max_bytes)
        if len(data) <= _INLINE_BYTES:  # a thread hop costs more than decoding a small image
            return decode_image(data)
        return await asyncio.to_thread(decode_image, data)

    @api.post("/predict/{task}", openapi_extra=_BODY, summary="Top-k labels of an image under a task")
    async def predict(self, task: str, request: Request, topk: int = TopK) -> dict:
        """``task`` is a task name (its default version) or ``task@N``."""
        image = await self._image(request)
        try:  # one registry query per task name and resolve_ttl_s, in a thread; none in between
            row = self.cache.fresh(task) or await asyncio.to_thread(self.cache.resolve, task)
        except AdaptkitError as exc:
            raise _http(exc) from None
        self.cache.prefetch([row.ref])  # read while the batch before this request's computes
        result, size = await self._named((image, row.ref, topk))
        if isinstance(result, Exception):
            raise _http(result)
        return {"task": row.ref, "predictions": _labels(result), "batch": size}

    @api.post("/predict", openapi_extra=_BODY, summary="Top-k labels of an image, the task chosen by the router")
    async def predict_routed(self, request: Request, topk: int = TopK) -> dict:
        """No task named: the router picks the task whose classes the image fits best."""
        image = await self._image(request)
        result, size = await self._routed((image, topk))
        if isinstance(result, Exception):
            raise _http(result)
        return {"task": result.task, "confidence": result.confidence, "runner_up": result.runner_up,
                "runner_up_confidence": result.runner_up_confidence, "predictions": _labels(result.predictions),
                "rejected": result.rejected, "fit": result.fit, "passed_over": result.passed_over,
                "left_out": list(result.left_out), "batch": size}

    @api.get("/tasks", summary="Every task and its default version")
    async def tasks(self) -> list[dict]:
        rows = await asyncio.to_thread(self.cache.registry.tasks)
        out = []
        for t in rows:
            v = t.default
            out.append({"task": t.name, "default": v.ref if v else None, "versions": [x.version for x in t.versions],
                        "classes": list(t.classes), "method": v.method if v else None,
                        "backbone": v.backbone.name if v else None, "broken": t.broken})
        return out

    @api.get("/health", summary="Liveness, the device and the adapter cache's counters")
    async def health(self) -> dict:
        return {"status": "ok", "device": str(self.cache.predictor.device), "pid": os.getpid(),
                "cache": self.cache.stats().as_dict()}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _named(self, items: list[tuple]) -> list[tuple]:
        images, refs, ks = (list(x) for x in zip(*items, strict=True))
        out = await asyncio.to_thread(self.cache.predict_mixed, images, refs, ks)
        return [(r, len(items)) for r in out]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _routed(self, items: list[tuple]) -> list[tuple]:
        images, ks = (list(x) for x in zip(*items, strict=True))
        out = await asyncio.to_thread(self.cache.predict_auto, images, ks)
        return [(r, len(items)) for r in out]


def _number(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, str):
        try:
            value = kind(value) if value.lower() not in ("", "none", "null") else None
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    return value


def settings(args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The server's settings: :data:`DEFAULTS` updated by ``args`` (strings, as ``serve run`` passes, or typed
    values from a config file), each checked."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    s = {**DEFAULTS, **args}
    for name in ("cache_mb", "batch_wait_timeout_s", "replica_cpus", "replica_gpus", "resolve_ttl_s"):
        s[name] = check_float(name, _number(name, s[name], float), 0)
    for name, low in (("max_batch_size", 1), ("num_replicas", 1), ("max_ongoing_requests", 1), ("threads", 1),
                      ("max_image_bytes", 1)):
        s[name] = check_int(name, _number(name, s[name], int), low, optional=DEFAULTS[name] is None)
    auto = s["autoscaling_config"]
    if isinstance(auto, str):
        try:
            auto = json.loads(auto) if auto.strip() else None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"autoscaling_config must be a mapping or JSON object: {exc}") from None
    if auto is not None and not isinstance(auto, dict):
        raise ConfigError(f"autoscaling_config must be a mapping, got {auto!r}")
    s["autoscaling_config"] = auto
    for name in ("registry", "adapters", "device"):
        s[name] = None if s[name] in (None, "") else str(s[name])
    s["max_ongoing_requests"] = s["max_ongoing_requests"] or max(2 * s["max_batch_size"], 64)
    return s


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application ``serve run adaptkit.serving.ray_app:build_app key=value ...`` and ``serve deploy`` build.

    Args:
        args: settings by name (see :data:`DEFAULTS`); a local registry path is made absolute here, so replicas
            started in another folder find it.
    """
    s = settings(args)
    if s["registry"] and "://" not in s["registry"]:
        s["registry"] = os.path.abspath(s["registry"])
    if s["adapters"] and "://" not in s["adapters"]:
        s["adapters"] = os.path.abspath(s["adapters"])
    scale: dict[str, Any] = {"autoscaling_config": s["autoscaling_config"]} if s["autoscaling_config"] else \
        {"num_replicas": s["num_replicas"]}
    return AdaptkitServer.options(**scale, max_ongoing_requests=s["max_ongoing_requests"],
                                  ray_actor_options={"num_cpus": s["replica_cpus"],
                                                     "num_gpus": s["replica_gpus"]}).bind(s)

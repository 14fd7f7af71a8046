"""Experiment trackers fed from training's events: TensorBoard (``torch.utils.tensorboard``) and MLflow (its client).

:func:`open_trackers` starts one run per tracker before the first step; :meth:`Trackers.event` logs every
:class:`TrainEvent`-like event (per step: loss, images/s and learning rate; per epoch: train and validation accuracy
and loss); :meth:`Trackers.finish` logs the final metrics and the adapter file, and ends the runs.
:meth:`Trackers.record` is what the registry row keeps (the TensorBoard folder, the MLflow run id and URI).

Where runs go: TensorBoard writes ``LOG_DIR/TASK-TIMESTAMP`` (``LOG_DIR`` default ``runs``, as ``SummaryWriter``);
MLflow uses ``$MLFLOW_TRACKING_URI`` or MLflow's own default (``sqlite:///mlflow.db`` in the working folder), the
experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``adaptkit``; ``log_dir`` given, the store is ``LOG_DIR/mlflow.db`` and a
new experiment keeps its files in ``LOG_DIR/mlartifacts``. A tracking server is probed first: one that does not
answer within :data:`PROBE_TIMEOUT_S` is an error at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from adaptkit.errors import ConfigError, param

__all__ = ["TRACKERS", "Trackers", "check_trackers", "open_trackers"]

TRACKERS = ("tensorboard", "mlflow")
PROBE_TIMEOUT_S = 3.0  # a tracking server that accepts no connection within this is reported unreachable
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
EXTRA = "logging to {kind} needs the tracking extra: pip install 'adaptkit[tracking]'"


def check_trackers(kinds: str | Iterable[str] | None) -> tuple[str, ...]:
    """The tracker names, lower-case and without repeats; an unknown name is refused with the known ones."""
    if kinds is None:
        return ()
    items = [kinds] if isinstance(kinds, str) else list(kinds)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"log_to must name trackers ({', '.join(TRACKERS)}), got {item!r}")
        for name in (n.strip().lower() for n in item.split(",")):
            if name not in TRACKERS:
                raise ConfigError(f"unknown tracker {name!r}: use {' or '.join(TRACKERS)} (repeat "
                                  f"{param('log_to')} for both)")
            if name not in names:
                names.append(name)
    return tuple(names)


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``a.b`` keys with scalar values (lists and None as JSON text)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = json.dumps(value)
    return out


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class _TensorBoard:
    def __init__(self, log_dir: Path, run: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(EXTRA.format(kind="tensorboard")) from exc
        self.path = log_dir / run
        self.writer = SummaryWriter(log_dir=str(self.path))

    def params(self, params: dict[str, Any]) -> None:
        self.writer.add_text("recipe", "```\n" + json.dumps(params, indent=2, default=str) + "\n```")

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, params: dict[str, Any], metrics: dict[str, float], artifact: Path | None) -> None:
        self.writer.add_hparams(_flat(params), {f"final/{k}": v for k, v in metrics.items()}, run_name=".")
        self.writer.close()

    def fail(self) -> None:
        self.writer.close()

    def record(self) -> dict[str, Any]:
        return {"log_dir": str(self.path.resolve())}


def _probe(uri: str) -> None:
    """One TCP connect to an MLflow server within :data:`PROBE_TIMEOUT_S`, so an unreachable one is reported in
    seconds instead of after MLflow's minutes of retries; behind a proxy the client is left to find out."""
    url = urlparse(uri)
    if url.scheme not in ("http", "https") or any(os.environ.get(v) for v in _PROXIES):
        return
    try:
        with socket.create_connection((url.hostname or "localhost", url.port or (443 if url.scheme == "https" else
                                                                                   80)), PROBE_TIMEOUT_S):
            return
    except OSError as exc:
        raise ConfigError(f"no MLflow server answers at {uri} within {PROBE_TIMEOUT_S:g} s ({exc.strerror or exc})")\
            from None


class _MLflow:
    def __init__(self, log_dir: Path | None, run: str) -> None:
        try:
            import mlflow
        except ImportError as exc:
            raise ConfigError(EXTRA.format(kind="mlflow")) from exc
        for name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables...": noise
            logging.getLogger(name).setLevel(logging.WARNING)
        uri = f"sqlite:///{(log_dir / 'mlflow.db').resolve()}" if log_dir is not None else None
        artifacts = (log_dir / "mlartifacts").resolve().as_uri() if log_dir is not None else None
        self.uri = uri or mlflow.get_tracking_uri()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "adaptkit"
        try:
            _probe(self.uri)
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name, artifacts)
            self.run_id = self.client.create_run(exp_id, run_name=run).info.run_id
        except Exception as exc:  # noqa: BLE001  (a store that cannot be reached or written)
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ConfigError(f"cannot start an MLflow run at {self.uri}: {first[:200]} (set "
                              f"MLFLOW_TRACKING_URI, or pass {param('log_dir')} for a local store)") from None
        self.experiment = name

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in _flat(params).items()]
        for i in range(0, len(flat), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=flat[i:i + 100])

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "_"), v, now, step)
                                                     for k, v in values.items()])

    def finish(self, params: dict[str, Any], metrics: dict[str, float], artifact: Path | None) -> None:
        self.scalars({f"final/{k}": v for k, v in metrics.items()}, 0)
        if artifact is not None:
            self.client.log_artifact(self.run_id, str(artifact))
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")

    def record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri, "experiment": self.experiment}


class Trackers:
    """The open runs of one training; a no-op when no tracker was asked for."""

    def __init__(self, runs: dict[str, Any]) -> None:
        self.runs, self._global = runs, 0
        self._epoch: dict[str, float] = {}
        self._params: dict[str, Any] = {}  # what the run is (task, data set, backbone, method ...), kept for finish

    def __bool__(self) -> bool:
        return bool(self.runs)

    def _log(self, values: dict[str, float], step: int) -> None:
        for run in self.runs.values():
            run.scalars(values, step)

    def params(self, params: dict[str, Any]) -> None:
        self._params = dict(params)
        for run in self.runs.values():
            run.params(params)

    def event(self, e: Any) -> None:
        """Log one training event: ``train`` steps (loss, rate, lr) and the end of each ``val``."""
        if not self.runs:
            return
        if e.phase == "train":
            self._global += 1
            values = {"train/step_loss": e.step_loss, "train/images_per_s": e.images_per_s, "train/lr": e.lr}
            self._log({k: v for k, v in values.items() if v is not None}, self._global)
            if e.step == e.steps:
                self._epoch = {"epoch/train_loss": e.loss, "epoch/train_top1": e.accuracy}
        elif e.phase == "val" and e.step == e.steps and e.accuracy is not None:
            self._log({**self._epoch, "epoch/val_loss": e.loss, "epoch/val_top1": e.accuracy}, e.epoch)
        elif e.phase == "lr" and e.lr is not None:
            self._log({"lr_search/chosen": e.lr}, 0)

    def record(self) -> dict[str, Any]:
        """What the registry row keeps: each tracker's run (folder, or run id and URI)."""
        return {kind: run.record() for kind, run in self.runs.items()}

    def finish(self, params: dict[str, Any], metrics: dict[str, Any], artifact: Path | None) -> None:
        for run in self.runs.values():
            run.finish({**self._params, **params}, _numbers(metrics), artifact)

    def fail(self) -> None:
        for run in self.runs.values():
            try:
                run.fail()
            except Exception:  # noqa: BLE001, S110  (the training error is the one to report)
                pass


def open_trackers(kinds: Sequence[str] | str | None, *, run_name: str,
                  log_dir: str | os.PathLike | None = None) -> Trackers:
    """Start a run on each tracker in ``kinds`` (``tensorboard``, ``mlflow``; see the module for where they go).

    Raises:
        ConfigError: an unknown tracker, its extra missing, or a store that cannot be written.
    """
    names = check_trackers(kinds)
    root = Path(log_dir).expanduser() if log_dir is not None else None
    if root is not None and root.exists() and not root.is_dir():
        raise ConfigError(f"{param('log_dir', root)} is a file: give a folder for the runs")
    runs: dict[str, Any] = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        for name in names:
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
            if name == "tensorboard":
                runs[name] = _TensorBoard(root or Path("runs"), f"{run_name}-{stamp}")
            else:
                runs[name] = _MLflow(root, run_name)
    except BaseException:
        Trackers(runs).fail()
        raise
    return Trackers(runs)

"""ONNX graphs of registered tasks: one task (:func:`export_onnx`) or many tasks of one backbone in one graph
(:func:`export_onnx_registry`), to run with onnxruntime or any other ONNX runtime, with no adaptkit or torch.

The graph takes ``image``, a float32 (N, 3, H, W) batch already resized and normalised with the data config that
its metadata carries, and returns ``logits``. LoRA, SSF and BitFit tasks are merged into a copy of the weights first
(no extra cost per image); adapter, VPT, linear and full tasks are exported as they run in adaptkit. The exporter is
torch's own (``torch.export``-based, torch's default since 2.9); if it fails, the deprecated TorchScript exporter is
tried, with a warning. Reading back: :func:`read_onnx_metadata`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adaptkit
from adaptkit.artifacts import check_task_name, write_atomic
from adaptkit.checks import check_int
from adaptkit.errors import ConfigError, param, step
from adaptkit.methods import TaskContext, merge_lora, merge_ssf
from adaptkit.registry import Registry

__all__ = ["export_onnx", "export_onnx_registry", "read_onnx_metadata", "ONNX_EXTRA", "MERGED_METHODS"]

ONNX_EXTRA = "ONNX export needs the onnx extra: pip install 'adaptkit[onnx]'"
MERGED_METHODS = {"lora": merge_lora, "ssf": merge_ssf, "bitfit": merge_ssf}  # folded into the weights
DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
_MAX_BYTES = 2**31 - 2**24  # one protobuf message (the whole .onnx file) must stay under 2 GiB


class _Graph(nn.Module):
    """The exported forward: ``image -> logits`` of one task (a merged copy, or the task model itself)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


class _MixedGraph(nn.Module):
    """``(image, task_index) -> logits``: the trunk once, each sample through its task's sites and head.

    Heads are stacked to the largest class count; a task's padding logits are ``-inf`` (softmax gives them 0).
    """

    def __init__(self, trunk: nn.Module, ctx: TaskContext, slots: tuple[str, ...], heads: list[nn.Linear]) -> None:
        super().__init__()
        self.trunk, self.slots = trunk, slots
        self.__dict__["ctx"] = ctx  # not a submodule
        width, dim = max(h.out_features for h in heads), heads[0].in_features
        weight, bias = torch.zeros(len(heads), width, dim), torch.full((len(heads), width), float("-inf"))
        for i, h in enumerate(heads):
            weight[i, : h.out_features], bias[i, : h.out_features] = h.weight.detach(), h.bias.detach()
        self.register_buffer("head_weight", weight)
        self.register_buffer("head_bias", bias)

    def forward(self, image: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        with self.ctx.using(slot_order=self.slots, sample_slots=task_index):
            feats = self.trunk(image)
        return torch.bmm(self.head_weight[task_index], feats.unsqueeze(-1)).squeeze(-1) + self.head_bias[task_index]


def export_onnx(registry: Registry | str | None, ref: str, dest: str | os.PathLike, *, overwrite: bool = False,
                opset: int | None = None, dynamic_batch: bool = True) -> Path:
    """Write one task (backbone, adapter and head) as one ONNX graph, ``image`` (N, 3, H, W) -> ``logits`` (N, C).

    Args:
        registry: a :class:`Registry` or its URL (None: the default registry).
        ref: the version, ``task`` (its default) or ``task@N``.
        dest: the ``.onnx`` file, or an existing folder that gets ``TASK-vN.onnx``; its folder must exist.
        overwrite: replace an existing file.
        opset: the ONNX opset (None: the exporter's default).
        dynamic_batch: any batch size; False fixes it at 1.

    Returns:
        The path written. Its ``metadata_props`` hold the classes and data config as JSON, the task ref, method,
        whether it was merged, backbone name and fingerprint, the exporter and the adaptkit version.

    Raises:
        ConfigError: the onnx extra is missing, ``dest`` exists (without ``overwrite``) or its folder does not, or
            the graph cannot be exported. A broken or unknown version raises the registry's own error.
    """
    onnx = _need_onnx()
    check_int("opset", opset, 7, onnx.defs.onnx_opset_version(), optional=True)
    from adaptkit.inference import Predictor

    predictor = Predictor(registry, device="cpu")
    row = predictor.registry.get_version(ref)
    check_task_name(row.task.name)  # a name from the database may become a file name
    path = _check_dest(dest, f"{row.task.name}-v{row.version}.onnx", overwrite)
    task = predictor.load(ref)
    meta, merge = task.meta, MERGED_METHODS.get(task.meta.method)
    model = merge(task.model) if merge is not None else task.model.eval()
    _check_size(model, f"{task.ref} ({meta.backbone})")
    image = torch.zeros(2 if dynamic_batch else 1, *meta.data_config["input_size"])
    proto, exporter = _export(_Graph(model).eval(), (image,), ["image"], ["logits"], opset, dynamic_batch)
    props = {"task": task.ref, "method": meta.method, "method_config": json.dumps(meta.method_config),
             "merged": json.dumps(merge is not None), "classes": json.dumps(meta.classes)}
    return _finish(onnx, proto, path, {**props, **_common_props(meta, exporter)})


def export_onnx_registry(registry: Registry | str | None, dest: str | os.PathLike, refs: list[str] | None = None, *,
                         overwrite: bool = False, opset: int | None = None, dynamic_batch: bool = True) -> Path:
    """Write many tasks of one backbone as one graph: ``image`` (N, 3, H, W) and ``task_index`` (N,) int64 ->
    ``logits`` (N, C_max), sample b through task ``refs[task_index[b]]``; the backbone runs once per batch.

    This is adaptkit's mixed batch (:meth:`~adaptkit.inference.Predictor.logits_mixed`) frozen into the graph: each
    site applies every sample's own task from stacked tensors. Every sample pays for every task's sites (a task
    absent at a site adds exact zeros), and VPT prompts lengthen every sample's sequence, masked out of attention
    where they are not the sample's task's. Logits are padded to the largest class count with ``-inf``; the
    metadata says how many are real (``class_counts``) and names them (``tasks``: ref, method, classes).

    Args:
        registry: a :class:`Registry` or its URL (None: the default registry).
        dest: the ``.onnx`` file, or an existing folder that gets ``tasks.onnx``; its folder must exist.
        refs: the tasks, in ``task_index`` order (default: every task's default version, by name).
        overwrite, opset, dynamic_batch: as for :func:`export_onnx`.

    Raises:
        ConfigError: as :func:`export_onnx`, and for tasks on different backbones, a ``full`` task (its own copy
            of the backbone: export it alone) or adapters with different activations.
    """
    onnx = _need_onnx()
    check_int("opset", opset, 7, onnx.defs.onnx_opset_version(), optional=True)
    from adaptkit.inference import Predictor

    predictor = Predictor(registry, device="cpu")
    refs = [t.name for t in predictor.registry.tasks() if t.versions] if refs is None else list(refs)
    if not refs:
        raise ConfigError(f"no tasks to export: train one first ({step('train')}) or name the tasks")
    for ref in refs:
        predictor.registry.get_version(ref)  # unknown or broken versions fail before anything is built
    path = _check_dest(dest, "tasks.onnx", overwrite)
    tasks = [predictor.load(ref) for ref in refs]
    if len({id(t.host) for t in tasks}) > 1:
        raise ConfigError("the tasks are on different backbones: one graph holds one backbone; export each "
                          "backbone's tasks separately")
    full = [t.ref for t in tasks if t.model.trunk is not t.host.backbone.model]
    if full:
        raise ConfigError(f"{', '.join(full)} fine-tune(s) a copy of the backbone, which cannot share one pass with "
                          "other tasks: export it alone (export_onnx) or leave it out of refs")
    if len({t.meta.method_config.get("act", "gelu") for t in tasks if t.meta.method == "adapter"}) > 1:
        raise ConfigError("adapters with different activations cannot share one graph: export them separately")
    first = tasks[0]
    ctx, trunk = first.model.ctx, first.model.trunk
    graph = _MixedGraph(trunk, ctx, tuple(t.model.slot for t in tasks), [t.model.head for t in tasks]).eval()
    _check_size(graph, f"{len(tasks)} tasks on {first.meta.backbone}")
    image = torch.zeros(len(tasks) + 1 if dynamic_batch else 1, *first.meta.data_config["input_size"])
    index = torch.arange(image.shape[0]) % len(tasks)
    with _every_row(ctx):
        with torch.no_grad():
            graph(image, index)  # builds and caches every site's stacked tensors outside the trace
        proto, exporter = _export(graph, (image, index), ["image", "task_index"], ["logits"], opset, dynamic_batch)
    props = {"tasks": json.dumps([{"ref": t.ref, "method": t.meta.method, "classes": t.meta.classes}
                                  for t in tasks]),
             "class_counts": json.dumps([len(t.meta.classes) for t in tasks])}
    return _finish(onnx, proto, path, {**props, **_common_props(first.meta, exporter)})


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata_props`` of an exported graph, JSON values decoded (classes, data config, ...)."""
    onnx = _need_onnx()
    model = onnx.load(os.fspath(path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except ValueError:
            out[prop.key] = prop.value
    return out


# -- helpers ---------------------------------------------------------------------------------------------------


def _need_onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter writes through it)
    except ImportError as exc:
        raise ConfigError(ONNX_EXTRA) from exc
    return onnx


def _check_dest(dest: str | os.PathLike, default_name: str, overwrite: bool) -> Path:
    path = Path(dest).expanduser()
    if path.is_dir():
        path = path / default_name
    if not path.parent.is_dir():
        raise ConfigError(f"cannot export to {path}: folder {path.parent} does not exist: create it first or export "
                          "somewhere else")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path} is not a regular file: pick another path")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists already: pick another path or pass {param('overwrite', True)} to replace it")
    return path


def _check_size(model: nn.Module, what: str) -> None:
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if size > _MAX_BYTES:
        raise ConfigError(f"{what} has {size / 2**30:.1f} GiB of weights: over ONNX's 2 GiB limit for one file")


@contextlib.contextmanager
def _every_row(ctx: TaskContext) -> Iterator[None]:
    """Sites work on every sample of a mixed batch (a task without a module there adds zeros), so the graph has no
    data-dependent shapes (``TaskContext.rows`` would pick rows with ``nonzero``)."""
    ctx.rows = lambda present: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del ctx.rows


def _export(model: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str],
            opset: int | None, dynamic: bool) -> tuple[Any, str]:
    """The ONNX ModelProto of ``model`` and the exporter that made it: torch.export first, TorchScript after it."""
    batch = torch.export.Dim("batch")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, args, dynamo=True, input_names=inputs, output_names=outputs,
                                        opset_version=opset, verbose=False,
                                        dynamic_shapes=tuple({0: batch} for _ in args) if dynamic else None)
        return program.model_proto, "torch.export"
    except Exception as exc:  # noqa: BLE001  (any failure of the new exporter: try the old one)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        warnings.warn(f"torch's ONNX exporter failed ({first}); using the deprecated TorchScript exporter",
                      RuntimeWarning, stacklevel=3)
    import onnx

    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, buf, dynamo=False, input_names=inputs, output_names=outputs,
                              opset_version=opset or 18,
                              dynamic_axes={n: {0: "batch"} for n in [*inputs, *outputs]} if dynamic else None)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"cannot export to ONNX: {first}") from exc
    return onnx.load_from_string(buf.getvalue()), "torchscript"


def _common_props(meta: Any, exporter: str) -> dict[str, str]:
    data = {k: meta.data_config[k] for k in DATA_KEYS if k in meta.data_config}
    return {"data_config": json.dumps(data), "backbone": meta.backbone, "backbone_weights": meta.backbone_weights,
            "backbone_fingerprint": meta.backbone_fingerprint, "adaptkit_version": adaptkit.__version__,
            "exporter": exporter, "input": "image: float32 (N, 3, H, W), resized and normalised per data_config"}


def _finish(onnx: Any, proto: Any, path: Path, props: dict[str, str]) -> Path:
    """Add ``props`` to the graph's metadata, check it, and write it atomically."""
    kept = {p.key: p.value for p in proto.metadata_props if p.key not in props}
    onnx.helper.set_model_props(proto, {**kept, **props})
    proto.doc_string = f"adaptkit {adaptkit.__version__}: {props.get('task', 'several tasks')} on {props['backbone']}"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ConfigError(f"the exported graph does not pass onnx.checker: {str(exc).splitlines()[0]}") from exc
    try:
        write_atomic(path, proto.SerializeToString())
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
    return path

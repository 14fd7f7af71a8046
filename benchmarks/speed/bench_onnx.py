"""CPU inference of an exported ONNX graph (onnxruntime) against adaptkit's Predictor on the same task and images.

For each method, a task with random weights is registered on the backbone and exported with
:func:`adaptkit.interop.onnx.export_onnx`. Four paths are timed round-robin (one call of each per round), at each
thread setting and batch size:

* ``adaptkit logits``: ``Predictor.logits`` on a preprocessed batch (the model alone; the reference of the ratios);
* ``onnxruntime``: the exported graph on the same batch (CPUExecutionProvider);
* ``adaptkit predict``: ``Predictor.predict`` from PIL images to top-5 labels (preprocessing included);
* ``onnxruntime + preprocess``: the same preprocessing (``Predictor.preprocess``), the graph, a numpy top-5.

Thread settings: 1 (``torch.set_num_threads(1)`` and ``intra_op_num_threads=1``) and each library's default.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import base_parser, machine_line, print_table, ratio, register_task
from PIL import Image

from adaptkit.backbone import create_backbone
from adaptkit.inference import Predictor
from adaptkit.interop.onnx import export_onnx
from adaptkit.registry import Registry

SPECS = {"lora": ("lora", {"rank": 8}), "adapter": ("adapter", {"rank": 64}), "vpt": ("vpt", {"tokens": 10})}


def images(count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # 0: onnxruntime's default (one per physical core)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_round_robin(paths: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, one call of each per round, after a warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in paths}
    for round_ in range(repeats + 1):
        for label, fn in paths.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[label].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def run(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    reg = Registry(work / "r.db")
    backbone = create_backbone(args.backbone, weights=args.weights, pretrained=False)
    size = backbone.data_config["input_size"][-1]
    print(f"# ONNX against adaptkit, CPU, median of {args.repeats} rounds; {backbone.label}, {size}x{size}; "
          f"{machine_line()}", flush=True)
    exported, export_rows = {}, []
    for name in args.methods:
        method, config = SPECS[name]
        register_task(reg, backbone, name, method, config)
        start = time.perf_counter()
        exported[name] = export_onnx(reg, name, work / f"{name}.onnx")
        export_rows.append([name, f"{time.perf_counter() - start:.1f}", f"{exported[name].stat().st_size / 1e6:.1f}"])
    del backbone
    print_table(["method", "export s", "file MB"], export_rows)
    print(flush=True)
    predictor = Predictor(reg, device="cpu")
    default_threads = torch.get_num_threads()
    pics = images(max(args.batches), size)
    rows = []
    for threads in args.threads_list:
        torch.set_num_threads(threads or default_threads)
        for name, path in exported.items():
            sess = session(path, threads)
            task = predictor.load(name)
            for batch in args.batches:
                imgs = pics[:batch]
                x = predictor.preprocess(imgs, task)
                feed = {"image": x.numpy()}

                def ort_end_to_end(imgs=imgs, task=task, sess=sess) -> None:
                    logits = sess.run(None, {"image": predictor.preprocess(imgs, task).numpy()})[0]
                    np.argsort(-logits, axis=1)[:, :5]

                paths = {"adaptkit logits": lambda x=x, name=name: predictor.logits(x, name),
                         "onnxruntime": lambda sess=sess, feed=feed: sess.run(None, feed),
                         "adaptkit predict": lambda imgs=imgs, name=name: predictor.predict(imgs, name, topk=5),
                         "onnxruntime + preprocess": ort_end_to_end}
                medians = time_round_robin(paths, args.repeats)
                base = medians["adaptkit logits"]
                label = "1" if threads == 1 else f"default ({default_threads}/ort)"
                for path_name, t in medians.items():
                    rows.append([name, label, batch, path_name, f"{t * 1e3:.2f}", f"{t * 1e3 / batch:.2f}",
                                 f"{batch / t:.0f}", ratio(t, base)])
    print_table(["method", "threads", "batch", "path", "ms/batch", "ms/image", "images/s", "vs logits"], rows)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_pico_patch4_32",
                        help="timm ViT name (default: adaptkit's pico test ViT, a quick run)")
    parser.add_argument("--weights", default=None,
                        help="a local weights file, or `hub` (e.g. the packaged vit_cifar_tiny_patch4_32.adaptkit_c10);"
                             " default: random weights")
    parser.add_argument("--methods", nargs="+", default=["lora", "adapter"], choices=sorted(SPECS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads-list", nargs="+", type=int, default=[1, 0], metavar="N",
                        help="thread settings to measure; 0 is each library's default (default: 1 0)")
    args = parser.parse_args()
    if args.threads:
        args.threads_list = [args.threads]
    args.repeats = args.repeats or (5 if args.quick else 20)
    if os.environ.get("OMP_NUM_THREADS"):
        print(f"# note: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} caps torch's default threads")
    run(args)


if __name__ == "__main__":
    main()

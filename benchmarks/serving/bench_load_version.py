"""Reading one version's adapter file: through the registry's storage layer against reading the path directly.

``Registry.load_version`` (what the Predictor calls) checks the row, proves the path inside the adapter folder and
reads the file; ``load_adapter(path)`` is what the Predictor called before the storage layer existed. Both are timed
round-robin on one ViT-B adapter (r=8, 100 classes, random tensors on a backbone built on the meta device).

    python benchmarks/serving/bench_load_version.py [--repeats 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import timm
import torch

from adaptkit.artifacts import AdapterMeta, load_adapter
from adaptkit.methods import get_method
from adaptkit.registry import Registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    with torch.device("meta"):
        trunk = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        task = get_method("adapter", {"rank": 8}).attach(trunk, 100)
    state = {k: torch.randn(v.shape) * 0.01 for k, v in task.state().items()}
    meta = AdapterMeta(task="vitb", classes=[f"c{i}" for i in range(100)], method="adapter",
                       method_config=task.method.config_dict(), backbone="vit_base_patch16_224",
                       backbone_weights="hub", backbone_fingerprint="f" * 64, backbone_params=85_798_656,
                       backbone_dim=768, data_config={})
    with tempfile.TemporaryDirectory() as folder:
        reg = Registry(f"{folder}/r.db")
        row = reg.add_version(meta, state)
        path = reg.path_of(row)
        calls = {"direct": lambda: load_adapter(path, sha256=row.sha256), "through": lambda: reg.load_version(row)}
        times = {name: [] for name in calls}
        for i in range(args.repeats):
            for name in sorted(calls, reverse=i % 2 == 1):  # alternate which goes first
                tick = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - tick)
        direct, through = times["direct"], times["through"]
    a, b = min(direct), min(through)  # the least disturbed run of each: the machine is shared
    print("| file | load_adapter(path), best | Registry.load_version, best | ratio |\n| --- | --- | --- | --- |")
    print(f"| {row.bytes / 1e6:.2f} MB | {1e3 * a:.2f} ms | {1e3 * b:.2f} ms | {b / a:.2f} |")


if __name__ == "__main__":
    main()

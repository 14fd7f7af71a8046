"""A whole class-incremental benchmark: split a data set into tasks, train each in turn, evaluate after each addition.

Offline, on the packaged backbone and CIFAR-10 unpacked from ``../shared/data/cifar10.tar.gz``
(``mkdir -p ~/.cache/adaptkit/cifar10 && tar xzf ../shared/data/cifar10.tar.gz -C ~/.cache/adaptkit/cifar10``)::

    python examples/class_incremental.py --dataset folder:~/.cache/adaptkit/cifar10 --tasks 5 \\
        --backbone vit_cifar_tiny_patch4_32.adaptkit_c10 --epochs 3 --limit-train 4000

One task per data set instead (different kinds of images: digits, rendered letters, photos)::

    python examples/class_incremental.py --datasets digits folder:~/.cache/adaptkit/bench/glyphs \\
        folder:~/.cache/adaptkit/bench/cifar5 --backbone vit_cifar_tiny_patch4_32.adaptkit_c10 --epochs 5

The standard benchmark, on a GPU (CIFAR-100 in 10 tasks of 10 classes, ViT-B/16 pretrained on ImageNet-21k)::

    python examples/class_incremental.py --dataset cifar100 --tasks 10 --epochs 10 --batch-size 128

Each task is trained alone (``train(..., classes="0-9")``), which also stores its routing statistics; after every
addition the registered tasks are evaluated with no task name given (:func:`adaptkit.inference.evaluate_continual`),
with SimpleCIL (cosine nearest class mean on the frozen features) measured on the same images for comparison.
Keep the registry (``--registry PATH``) to compare more routers on it offline:
``benchmarks/accuracy/routing_offline.py``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from adaptkit.data import load_task_data
from adaptkit.inference import compare_routers
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, train

PUBLISHED = [("SimpleCIL / NCM", 83.4), ("RanPAC", 92.2), ("joint linear probe", 87.9),
             ("joint full fine-tuning", 93.8)]


def splits(dataset: str, tasks: int, data_dir: str | None) -> list[str]:
    """Class ranges ``a-b`` splitting the data set's classes into ``tasks`` equal consecutive parts."""
    n = len(load_task_data(dataset, {"input_size": (3, 32, 32)}, data_dir=data_dir, augment=False,
                           limit_eval=1).classes)
    if n % tasks:
        raise SystemExit(f"{dataset} has {n} classes: pick --tasks that divides it")
    size = n // tasks
    return [f"{i * size}-{(i + 1) * size - 1}" for i in range(tasks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="one data set to split into --tasks tasks of consecutive classes")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--datasets", nargs="+", help="one task per data set instead")
    parser.add_argument("--backbone", default="vit_cifar_tiny_patch4_32.adaptkit_c10")
    parser.add_argument("--method", default="adapter")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, help="default: the method's base rate scaled to the batch, as `train` does")
    parser.add_argument("--augment", choices=["none", "light", "strong"], default="light")
    parser.add_argument("--limit-train", type=int, help="training images per task")
    parser.add_argument("--limit-eval", type=int, help="test images per task")
    parser.add_argument("--data-dir")
    parser.add_argument("--registry", help="default: a temporary one")
    parser.add_argument("--routers", nargs="+", default=["qda", "lda", "ridge", "ncm"],
                        help="routers to compare; the first is the one the per-task table shows (qda: the default)")
    parser.add_argument("--json", help="write the reports to this file")
    args = parser.parse_args()
    if bool(args.dataset) == bool(args.datasets):
        parser.error("give --dataset (split into --tasks) or --datasets (one task each)")

    registry = Registry(args.registry or Path(tempfile.mkdtemp(prefix="adaptkit-cil-")) / "registry.db")
    if args.dataset:
        plan = [(args.dataset, c, f"t{i}-{c}") for i, c in enumerate(splits(args.dataset, args.tasks, args.data_dir))]
    else:
        plan = [(spec, None, f"t{i}-{Path(spec.partition(':')[2] or spec).name}") for i, spec in
                enumerate(args.datasets)]
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, augment=args.augment,
                         limit_train=args.limit_train, limit_eval=args.limit_eval)
    for spec, classes, task in plan:
        tick = time.perf_counter()
        result = train(spec, task=task, backbone=args.backbone, method=args.method,
                       method_config={"rank": args.rank} if args.method in ("adapter", "lora") else None,
                       config=config, registry=registry, data_dir=args.data_dir, classes=classes)
        print(f"trained {task}: {result.version.task.classes[:4]}... test top-1 {result.metrics['test_top1']:.1%} "
              f"({time.perf_counter() - tick:.0f} s)", flush=True)

    refs = [task for _, _, task in plan]
    tick = time.perf_counter()
    reports = compare_routers(refs, args.routers, registry=registry, limit=args.limit_eval, data_dir=args.data_dir,
                              refine=True)
    print(f"evaluated ({time.perf_counter() - tick:.0f} s)", flush=True)

    first = reports[args.routers[0]]
    print(f"\n{len(refs)} tasks, {sum(first.images)} test images; accuracy after each task is added (%)\n")
    print("| after task | task-id | class-incr. | task given | SimpleCIL | refined (top-2) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, ref in enumerate(first.tasks):
        print(f"| {k + 1}: {ref} | {100 * first.task_id[k]:.1f} | {100 * first.cil[k]:.1f} | "
              f"{100 * first.til[k]:.1f} | {100 * first.simplecil[k]:.1f} | {100 * first.refined[k]:.1f} |")
    print("\n| router | task-id | final class-incr. | refined (top-2) | average incremental | forgetting | "
          "task given | SimpleCIL |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for router, r in reports.items():
        print(f"| {router} | {100 * r.task_id[-1]:.1f} | {100 * r.final:.1f} | {100 * r.refined[-1]:.1f} | "
              f"{100 * r.average_incremental:.1f} | {100 * r.forgetting:.1f} | {100 * r.til[-1]:.1f} | "
              f"{100 * r.simplecil[-1]:.1f} |")
    print("\nPublished, not measured here (ViT-B/16 IN-21k, CIFAR-100 in 10 tasks, final accuracy): "
          + ", ".join(f"{name} {acc} %" for name, acc in PUBLISHED))
    if args.json:
        Path(args.json).write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=1))


if __name__ == "__main__":
    main()

"""The method table on VTAB-1k-style splits with ViT-B/16 on a GPU, beside the published V-PETL Bench figures.

    python benchmarks/accuracy/vtab_table.py                        # every method, the VTAB tasks torchvision can fetch
    python benchmarks/accuracy/vtab_table.py --tasks cifar100 dtd --only adapter lora

VTAB-1k trains each task on 1,000 images: :func:`vtab_1k` draws 800 train + 200 val (seeded) from any data set's
training split; they are written as an image folder (``train/``: the 1,000, of which adaptkit carves the 200 as its
validation split with ``val_fraction=0.2``; ``test/``: the whole test split) and trained with the same budget for
every method (ViT-B/16 IN-21k, 100 epochs, batch 64, no augmentation, the method's default learning rate). Each
finished (task, method) row is kept in ``benchmarks/results/vtab_table.json``, so a run resumes.

This needs a CUDA GPU, the backbone's weights (from the hub or its cache) and the data sets (downloaded by
torchvision); without them it stops at once and says what is missing. Only 6 of VTAB-1k's 19 tasks are torchvision
sets that adaptkit knows, so its mean is over those tasks: **not** the same figure as the published mean of group
means over all 19, printed beside it for orientation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from method_table import CONFIGS, label, load, resolve, row_key, save  # noqa: E402

from adaptkit.errors import AdaptkitError  # noqa: E402

BACKBONE = "vit_base_patch16_224.augreg_in21k"
RESULTS = Path(__file__).resolve().parents[1] / "results" / "vtab_table.json"
ROOT = Path.home() / ".cache" / "adaptkit" / "vtab1k"
# VTAB-1k tasks that adaptkit reads from torchvision, by group (the rest: caltech101, sun397, camelyon, resisc45,
# retinopathy and the eight structured tasks are not torchvision sets adaptkit knows).
TASKS = {"cifar100": "natural", "dtd": "natural", "flowers102": "natural", "oxford_pets": "natural",
         "svhn": "natural", "eurosat": "specialized"}
# Published VTAB-1k mean of group means, ViT-B/16 IN-21k (V-PETL Bench; Adapter+: its paper), by our method name.
PUBLISHED = {"full": 68.97, "linear": 57.64, "adapter (sequential, as Houlsby/Pfeiffer)": 73.86, "lora": 74.60,
             "adapter (parallel, as AdaptFormer)": 74.75, "vpt (deep)": 71.97, "ssf": 75.69, "FacT": 75.55,
             "best in V-PETL Bench": 78.13, "adapter+ (Steitz & Roth 2024)": "77.6-77.9"}
BUDGET = {"epochs": 100, "batch_size": 64, "augment": False, "seed": 0, "val_fraction": 0.2}


def vtab_1k(num_images: int, seed: int = 0, train: int = 800, val: int = 200) -> tuple[list[int], list[int]]:
    """Seeded VTAB-1k draw from a training split of ``num_images``: (800 train indices, 200 val indices)."""
    if num_images < train + val:
        raise ValueError(f"a VTAB-1k split needs {train + val} training images, the data set has {num_images}")
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[:train], order[train:train + val]


def preflight(backbone: str = BACKBONE) -> list[str]:
    """What stops this script here (no GPU, weights not at hand); empty when it can run."""
    from adaptkit.backbone import create_backbone

    problems = []
    if not torch.cuda.is_available():
        problems.append("it needs a CUDA GPU (ViT-B/16, 100 epochs per task and method) and this machine has none")
    try:
        create_backbone(backbone)  # offline with no cached weights: an OfflineError within seconds
    except AdaptkitError as exc:
        problems.append(str(exc))
    return problems


def materialise(task: str, root: Path, seed: int = 0) -> str:
    """Write the task's VTAB-1k folder (``train/`` 1,000 images, ``test/`` the test split) once; its spec."""
    from adaptkit.data import load_task_data

    out = root / task
    if (out / "done").is_file():
        return f"folder:{out}"
    data = load_task_data(task, {"input_size": (3, 224, 224)}, val_fraction=0.0, download=True)
    train_idx, val_idx = vtab_1k(len(data.train), seed)
    for split, view, picks in (("train", data.train, train_idx + val_idx), ("test", data.test, range(len(data.test)))):
        for n, i in enumerate(picks):
            img, y = view.source[view.indices[i]]
            folder = out / split / f"{y:03d}_{data.classes[y]}".replace("/", "_")
            folder.mkdir(parents=True, exist_ok=True)
            img.convert("RGB").save(folder / f"{n:06d}.png")
    (out / "done").write_text("ok\n")
    return f"folder:{out}"


def main(argv: list[str] | None = None) -> None:
    from adaptkit.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--only", nargs="*", default=None, help="methods (default: every registered one)")
    parser.add_argument("--root", type=Path, default=ROOT, help="where the VTAB-1k folders are written")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    problems = preflight()
    if problems:
        raise SystemExit("vtab_table.py cannot run here: " + "; ".join(problems) + ". Run it on a GPU machine with "
                         "network (or the hub cache); offline, benchmarks/accuracy/method_table.py is the table that "
                         "runs.")
    from adaptkit.registry import Registry
    from adaptkit.training import TrainConfig, train

    depth = 12
    methods = [m for m in METHODS if args.only is None or m in args.only]
    rows = load(args.results)
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp) / "r.db")
        for task in args.tasks:
            spec = materialise(task, args.root)
            for method in methods:
                for config in (resolve(c, depth) for c in CONFIGS.get(method, [{}])):
                    key = row_key(task, method, config)
                    if key not in rows:
                        result = train(spec, task=f"{task}-{len(rows)}", backbone=BACKBONE, method=method,
                                       method_config=config, config=TrainConfig(**BUDGET), registry=registry)
                        rows[key] = {"test_top1": result.metrics["test_top1"],
                                     "trainable_params": result.version.trainable_params}
                        save(args.results, rows)
    print(table(rows, args.tasks, methods, depth))


def table(rows: dict, tasks: list[str], methods: list[str], depth: int) -> str:
    """Our mean of group means over ``tasks`` per method, then the published figures, labelled as published."""
    lines = [f"| method | ours: mean of group means over {len(tasks)} VTAB-1k tasks | trainable parameters |",
             "| --- | --- | --- |"]
    for method in methods:
        for config in (resolve(c, depth) for c in CONFIGS.get(method, [{}])):
            found = {t: rows[row_key(t, method, config)] for t in tasks if row_key(t, method, config) in rows}
            if not found:
                continue
            groups = {}
            for t, r in found.items():
                groups.setdefault(TASKS[t], []).append(100 * r["test_top1"])
            mean = statistics.mean(statistics.mean(v) for v in groups.values())
            params = next(iter(found.values()))["trainable_params"]
            lines.append(f"| {label(method, config, depth)} | {mean:.2f} | {params:,} |")
    lines += ["", "| method | **published** VTAB-1k mean of group means (19 tasks, ViT-B/16 IN-21k) |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in PUBLISHED.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Routed prediction (no task name) over K tasks against a one-task prediction of the same batch.

``Predictor.predict_auto`` runs the bare backbone once to route every image, then one mixed pass through each image's
chosen task; ``predict`` runs one pass through one task. The target is at most 2.1x. The tasks are adapters r=64 with
random weights and routing statistics drawn so that the batch spreads over every task.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import base_parser, machine_line, parse, print_table, randomize, ratio, round_robin

from adaptkit.artifacts import AdapterMeta
from adaptkit.backbone import Backbone, create_backbone
from adaptkit.inference import Predictor, RoutingStats
from adaptkit.methods import get_method, unwrap
from adaptkit.registry import Registry


def register_routed(reg: Registry, backbone: Backbone, refs: list[str], num_classes: int, rank: int,
                    x: torch.Tensor, blocks: int | None = None,
                    methods: list[tuple[str, dict]] | None = None) -> None:
    """Random adapter tasks with routing statistics whose class means sit near the features of images b = i mod K,
    so that the batch ``x`` spreads over every task (``methods``: task i is ``(method, config)`` i instead)."""
    d = backbone.embed_dim
    with torch.inference_mode():
        feats = backbone.model(x).float().cpu()
    for i, ref in enumerate(refs):
        torch.manual_seed(i)
        method, config = methods[i] if methods else ("adapter", {"rank": rank, "blocks": blocks})
        model = get_method(method, config).attach(backbone.model, num_classes)
        randomize(model)
        means = feats[i % len(feats)] + 0.01 * torch.randn(num_classes, d) * feats.std()
        stats = RoutingStats(means=means, counts=torch.full((num_classes,), 100),
                             scatter=torch.eye(d) * feats.var() * 100 * num_classes)
        meta = AdapterMeta(task=ref, classes=[f"c{i}" for i in range(num_classes)], method=method,
                           method_config=model.method.config_dict(), backbone=backbone.name,
                           backbone_weights=backbone.weights, backbone_fingerprint=backbone.fingerprint,
                           backbone_params=backbone.num_params, backbone_dim=d, data_config=backbone.data_config,
                           dataset="random")
        reg.add_version(meta, {**model.state(), **stats.to_tensors()})
        model.detach_from_trunk()
        unwrap(backbone.model)


def cases(predictor: Predictor, refs: list[str], x: list[torch.Tensor]) -> dict:
    """The ways to predict batch ``x``: with one task named, routed over every task, and through every task."""
    return {
        "one task (`predict`)": lambda: predictor.predict(x, refs[0]),
        f"routed over {len(refs)} tasks (`predict_auto`)": lambda: predictor.predict_auto(x),
        f"every task ({len(refs)} passes)": lambda: [predictor.predict(x, r) for r in refs],
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--backbone", nargs="+", help="timm names [default: ViT-Ti/16 (and ViT-B/16 unless --quick)]")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--blocks", type=int, nargs="*", default=[],
                        help="also tasks with adapters in the last K blocks only (the routed pass then starts at "
                             "the frozen pass's tokens of block depth-K), e.g. --blocks 6")
    args = parse(parser)
    names = args.backbone or (["vit_tiny_patch16_224"] if args.quick else ["vit_tiny_patch16_224",
                                                                          "vit_base_patch16_224"])
    batch = args.batch or (16 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 5)
    rows = []
    for name in names:
        for blocks in [None, *args.blocks]:
            with tempfile.TemporaryDirectory() as tmp:
                reg = Registry(Path(tmp) / "reg.db")
                backbone = create_backbone(name, pretrained=False)
                refs = [f"t{i}" for i in range(args.tasks)]
                x = torch.randn(batch, *backbone.data_config["input_size"])
                register_routed(reg, backbone, refs, 10, args.rank, x, blocks)
                predictor = Predictor(reg, device=args.device)
                x = list(x.to(args.device))
                spread = len({r.task for r in predictor.predict_auto(x)})
                times = round_robin(cases(predictor, refs, x), repeats)
            single = times["one task (`predict`)"]
            where = "every block" if blocks is None else f"last {blocks} blocks"
            rows += [[name, where, batch, label, f"{t * 1e3:.0f}", ratio(t, single)] for label, t in times.items()]
            rows[-2][3] += f", batch spread over {spread} tasks"
    print(f"# routed prediction, adapter r{args.rank}, median of {repeats} rounds; {machine_line()}")
    print_table(["backbone", "adapters in", "batch", "how", "ms", "vs one task"], rows)


if __name__ == "__main__":
    main()

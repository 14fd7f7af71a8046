"""The routed pass with "no task fits" read on the blocks' tokens and the patch spectrum (issue 37) against the
routed pass as it was (the pooled output's score) and as the first fix left it (the tokens without the spectrum): the
same tasks, files with and without the token statistics or the spectrum's place, rounds interleaved.

The tasks are adapters r=64 with random weights (as ``bench_routing.py``); each one's routing statistics and both
rejection scores are computed by adaptkit's own code from a frozen pass over 60 images near one of the batch's, so
the batch spreads over every task and both scores are calibrated. Goal: within 1.15x.

    OMP_NUM_THREADS=1 python benchmarks/serving/bench_reject.py --threads 1
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import base_parser, machine_line, parse, print_table, ratio, round_robin  # noqa: E402
from serving.bench_routing import register_routed  # noqa: E402

from adaptkit.artifacts import load_adapter  # noqa: E402
from adaptkit.backbone import create_backbone  # noqa: E402
from adaptkit.inference import ROUTING_PREFIX, Calibration, Predictor, collect_stats, split_state  # noqa: E402
from adaptkit.models import PACKAGED_BACKBONE  # noqa: E402
from adaptkit.registry import Registry  # noqa: E402


def task_stats(backbone, x: torch.Tensor, tasks: int, classes: int) -> list:
    """Each task's statistics, both scores calibrated, from 60 images near image ``i mod B`` of ``x``."""
    out = []
    for i in range(tasks):
        g = torch.Generator().manual_seed(i)
        images = x[i % len(x)] + 0.3 * torch.randn(60, *x.shape[1:], generator=g)
        stats = collect_stats(backbone.model, [(images, torch.arange(60) % classes)], classes,
                              calibration=Calibration(60, classes))
        assert stats.tokens is not None and stats.calibrated
        out.append(stats)
    return out


def use_stats(reg: Registry, refs: list[str], stats: list, drop: str) -> None:
    """Write each task's statistics into its file, without the tensors whose names start with ``drop`` after the
    routing prefix (as files written before: ``tokens.``, none; ``tokens.-1.``, no spectrum; "": all kept)."""
    for ref, st in zip(refs, stats, strict=True):
        row = reg.get_version(ref)
        state, meta = load_adapter(reg.path_of(row))
        tensors = {k: v for k, v in st.to_tensors().items() if not drop or not k.startswith(f"{ROUTING_PREFIX}{drop}")}
        reg.replace_file(row, {**split_state(state)[0], **tensors}, meta)


def token_bytes(reg: Registry, ref: str) -> tuple[int, int]:
    """Bytes of a version's pooled routing statistics and of its token statistics."""
    state = load_adapter(reg.path_of(reg.get_version(ref)))[0]
    sizes = {k: t.numel() * t.element_size() for k, t in state.items() if k.startswith(ROUTING_PREFIX)}
    tok = sum(v for k, v in sizes.items() if k.startswith(f"{ROUTING_PREFIX}tokens."))
    return sum(sizes.values()) - tok, tok


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--backbone", nargs="+", default=[PACKAGED_BACKBONE, "vit_tiny_patch16_224"])
    parser.add_argument("--batch", type=int, default=32)
    args = parse(parser)
    repeats = args.repeats or 7
    rows, sizes = [], []
    for name in args.backbone:
        with tempfile.TemporaryDirectory() as tmp:
            backbone = create_backbone(name, pretrained=name == PACKAGED_BACKBONE)
            x = torch.randn(args.batch, *backbone.data_config["input_size"])
            refs = [f"t{i}" for i in range(args.tasks)]
            predictors = {}
            stats = task_stats(backbone, x, args.tasks, 10)
            for label, drop in (("pooled score (before)", "tokens."), ("block tokens (first fix)", "tokens.-1."),
                                ("block tokens and spectrum (now)", "")):
                folder = Path(tmp) / label.split()[-1].strip("()")
                folder.mkdir()
                reg = Registry(folder / "reg.db")
                register_routed(reg, backbone, refs, 10, 64, x)
                use_stats(reg, refs, stats, drop)
                predictors[label] = Predictor(reg, device=args.device)
                if not drop:
                    sizes.append([name, *(f"{b / 1e3:.0f}" for b in token_bytes(reg, refs[0]))])
            batch = list(x.to(args.device))
            spread = {k: len({r.task for r in p.predict_auto(batch)}) for k, p in predictors.items()}
            cases = {f"routed, rejection on the {k}": (lambda p=p, b=batch: p.predict_auto(b))
                     for k, p in predictors.items()}
            now = predictors["block tokens and spectrum (now)"]
            cases["routed, --accept-all (no rejection)"] = lambda p=now, b=batch: p.predict_auto(b, accept_all=True)
            times = round_robin(cases, repeats)
            base = times["routed, rejection on the pooled score (before)"]
            rows += [[name, args.batch, k, f"{t * 1e3:.1f}", ratio(t, base)] for k, t in times.items()]
            rows[-4][2] += f" (batch spread over {max(spread.values())} tasks)"
            print_table(["backbone", "batch", "how", "ms", "vs before"], rows[-4:])
            sys.stdout.flush()
    print(f"# routed prediction over {args.tasks} tasks, median of {repeats} interleaved rounds; {machine_line()}")
    print_table(["backbone", "batch", "how", "ms", "vs before"], rows)
    print("\nrouting statistics per task (10 classes), kB")
    print_table(["backbone", "pooled (before)", "block tokens and spectrum (added)"], sizes)


if __name__ == "__main__":
    main()

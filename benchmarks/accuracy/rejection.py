"""Does "no task fits" hold for broad photo tasks? Every (task, unknown kind) pair, with the rejection score on
the pooled output (before issue 37), on the blocks' mean patch tokens (the first fix) and on those and the spectrum
of the patch embeddings (shipped), on the packaged backbone.

Each task's statistics and held-out percentiles come from its training images (train + validation, the split
training makes) through adaptkit's own code (:func:`adaptkit.inference.accumulate_stats`, the same sums, folds and
percentiles ``adaptkit train`` computes); its test images and every image of the unknown kinds are never seen.
For each pair: the AUROC of the score (the task's own test images against the other kind's) and the share of the
other kind rejected at the default rate (5 %); per task, the share of its own test images rejected.

Tasks: the colour-photo tasks ``photos5``, ``photos2`` (cifar10-mini) and ``photos3`` (held out), the grey-photo
tasks ``grey5`` and ``grey2``, and the narrow ones (``digits``, ``glyphs``). Unknown kinds: those of
``common.data.routing_specs()`` and ``heldout_specs()`` that are of another kind (digits, glyphs, synthetic images,
line drawings, blurred photos, grey photos for a colour task), on which the places were chosen, and four no choice
was made on (``unknown_specs()``: inverted photos, photos turned a quarter, texture-like images; and
``common.photos``: crops of the photos bundled with scikit-learn and scikit-image, colour photos of other objects
from another source).

    pip install -e .[bench]                          # scikit-image, for its bundled photos
    python benchmarks/accuracy/rejection.py          # ~3 min the first time (a frozen pass over every set), then ~1 min
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from adaptkit.backbone import create_backbone
from adaptkit.data import load_task_data
from adaptkit.inference import DEFAULT_REJECT_RATE, Calibration, Router, Whitener, accumulate_stats
from adaptkit.inference.token_stats import token_blocks
from adaptkit.models import PACKAGED_BACKBONE
from adaptkit.trunk import SPECTRUM, run_prefix

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import print_table  # noqa: E402
from common.data import ROOT, heldout_specs, routing_specs, unknown_specs  # noqa: E402
from common.photos import make_other_photos  # noqa: E402

COLOUR = ("photos5", "photos2", "photos3")
GREY = ("grey5", "grey2")
NARROW = ("digits", "glyphs")
TASKS = (*COLOUR, *GREY, *NARROW)
TUNED_KINDS = ("digits", "glyphs", "synthetic", "sketch3", "blur10", "grey2")  # the places were chosen on these
NEW_KINDS = ("inverted", "rotated", "texture", "other")  # no choice was made on these
KINDS = (*TUNED_KINDS, *NEW_KINDS)


def unknown_for(task: str) -> list[str]:
    """The kinds offered to ``task`` as images of no task of its kind (its own kind and grey photos to a grey task
    left out)."""
    return [k for k in KINDS if k != task and not (task in GREY and k == "grey2")]


@torch.inference_mode()
def dump(path: Path) -> dict:
    """Per set and split: (pooled (N, d), mean patch tokens after every block (N, depth, d), labels, the patch
    embeddings' spectrum (N, k)); cached."""
    if path.is_file():
        return torch.load(path)
    backbone = create_backbone(PACKAGED_BACKBONE)
    model = backbone.model.eval()
    depth = len(model.blocks)
    specs = {**routing_specs(), **heldout_specs(), **unknown_specs(), "other": f"folder:{make_other_photos(ROOT)}"}
    out = {}
    for name in sorted({*TASKS, *KINDS}):
        data = load_task_data(specs[name], backbone.data_config, val_fraction=0.1, seed=0, augment="none")
        out[name] = {"classes": data.classes}
        for part in ("train", "val", "test"):
            ds = getattr(data, part)
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            pooled, tokens, spectra = [], [], []
            for k in range(0, len(x), 256):
                taps = dict.fromkeys([SPECTRUM, *range(depth)])
                pooled.append(run_prefix(model, x[k:k + 256], depth, taps))
                tokens.append(torch.stack([taps[b] for b in range(depth)], 1))
                spectra.append(taps[SPECTRUM])
            out[name][part] = (torch.cat(pooled), torch.cat(tokens), torch.tensor([ds[i][1] for i in range(len(ds))]),
                               torch.cat(spectra))
    torch.save(out, path)
    return out


def auroc(own: torch.Tensor, other: torch.Tensor) -> float:
    """P(an image of the other set scores higher than one of the task's own), ties counted half."""
    ranks = torch.cat([own, other]).double().argsort().argsort().double() + 1
    above = ranks[len(own):].sum() - len(other) * (len(other) + 1) / 2
    return (above / (len(own) * len(other))).item()


def _taps(entry: tuple, blocks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """A split's (pooled, tokens, labels, spectrum) -> place -> (N, d): the mean patch tokens, the pooled output at
    ``depth``, the spectrum at :data:`SPECTRUM`."""
    depth = entry[1].shape[1]
    return {b: entry[3] if b == SPECTRUM else entry[1][:, b] if b < depth else entry[0] for b in blocks}


def stats_of(entry: dict, blocks: tuple[int, ...]):
    """The task's statistics (pooled and tokens) from train + val, as training computes them."""
    x = torch.cat([entry["train"][0], entry["val"][0]])
    taps = {b: torch.cat([_taps(entry["train"], blocks)[b], _taps(entry["val"], blocks)[b]]) for b in blocks}
    y = torch.cat([entry["train"][2], entry["val"][2]])
    c = len(entry["classes"])
    batches = [(x[i:i + 256], y[i:i + 256], {b: t[i:i + 256] for b, t in taps.items()}) for i in range(0, len(x), 256)]
    return accumulate_stats(batches, c, Calibration(len(x), c), blocks=blocks)


SCORES = ("pooled (before)", "block tokens (first fix)", "+ patch spectrum (now)")


def scorers(stats, first):
    """name -> (fn of a split entry (pooled, tokens, labels, spectrum) -> scores, fn of scores -> fit); ``stats``
    with every place, ``first`` without the spectrum (as the first fix made them)."""
    w = Whitener.of(stats.means, stats.counts, stats.scatter, stats.ood_shrinkage)
    old, tok = first.tokens, stats.tokens
    return dict(zip(SCORES, ((lambda e: w.scores(e[0]), stats.fit),
                             (lambda e: old.scores(_taps(e, old.blocks)), old.fit),
                             (lambda e: tok.scores(_taps(e, tok.blocks)), tok.fit)), strict=True))


def table(feats: dict, blocks: tuple[int, ...]) -> tuple[list[str], list[list[str]], dict]:
    rows, summary = [], {}
    for task in TASKS:
        stats, first = stats_of(feats[task], blocks), stats_of(feats[task], blocks[1:])
        for label, (score, fit) in scorers(stats, first).items():
            own = score(feats[task]["test"])
            row = [task, label, f"{100 * (fit(own) < DEFAULT_REJECT_RATE).double().mean():.0f}"]
            for kind in KINDS:
                if kind not in unknown_for(task):
                    row.append("")
                    continue
                other = score(feats[kind]["test"])
                a, r = auroc(own, other), 100 * (fit(other) < DEFAULT_REJECT_RATE).double().mean().item()
                summary.setdefault(label, []).append((task, kind, a, r))
                row.append(f"{a:.2f} / {r:.0f}")
            rows.append(row)
    return ["task", "score", "own test rejected %", *(f"{k}: AUROC / rejected %" for k in KINDS)], rows, summary


REGISTERED = ("digits", "glyphs", "photos5", "grey5")  # the four tasks routing_ood.py routes over
ROUTED_KINDS = ("synthetic", "sketch3", "blur10", "inverted", "rotated", "texture", "other")


def table_routed(feats: dict, blocks: tuple[int, ...]) -> tuple[list[str], list[list[str]]]:
    """Routed as ``predict_auto`` does over :data:`REGISTERED`: the share of each set rejected by its chosen task."""
    routers = [Router([stats_of(feats[t], b) for t in REGISTERED]) for b in (blocks, blocks[1:], blocks)]
    rows = []
    for label, use, router in zip(SCORES, (False, True, True), routers, strict=True):
        row = [label]
        for name in (*REGISTERED, *ROUTED_KINDS):
            e = feats[name]["test"]
            routes = router.route(e[0], _taps(e, blocks) if use else None)
            chosen = routes.task_probs.argmax(1)
            rejected = routes.fit.gather(1, chosen[:, None])[:, 0] < DEFAULT_REJECT_RATE
            row.append(f"{100 * rejected.double().mean().item():.0f}")
        rows.append(row)
    return ["score", *(f"{n} (own) %" for n in REGISTERED), *(f"{n} %" for n in ROUTED_KINDS)], rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, default=ROOT / "rejection-features-v3.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    feats = dump(args.features)
    depth = feats[TASKS[0]]["train"][1].shape[1]
    blocks = token_blocks(depth)
    sizes = ", ".join(f"{t} {len(feats[t]['train'][2]) + len(feats[t]['val'][2])}/{len(feats[t]['test'][2])}"
                      for t in TASKS)
    print(f"{PACKAGED_BACKBONE}, the patch embeddings' spectrum ({feats[TASKS[0]]['train'][3].shape[1]} eigenvalues), "
          f"the mean patch token after blocks {[b + 1 for b in blocks[1:-1]]} of {depth} and the pooled output; "
          f"training/test images: {sizes}\n")
    head, rows, summary = table(feats, blocks)
    print_table(head, rows)
    print()
    out = []
    for label, pairs in summary.items():
        for group, names in (("colour-photo tasks", COLOUR), ("grey-photo tasks", GREY), ("narrow tasks", NARROW)):
            for kinds, which in ((TUNED_KINDS, "tuned"), (NEW_KINDS, "held out")):
                sel = [p for p in pairs if p[0] in names and p[1] in kinds]
                out.append([label, group, which, f"{sum(p[2] for p in sel) / len(sel):.3f}",
                            f"{min(p[2] for p in sel):.2f}", f"{sum(p[2] >= 0.95 for p in sel)}/{len(sel)}",
                            f"{min(p[3] for p in sel):.0f}", f"{sum(p[3] >= 90 for p in sel)}/{len(sel)}"])
    print_table(["score", "tasks", "kinds", "mean AUROC", "worst AUROC", "pairs AUROC >= 0.95", "least rejected %",
                 "pairs >= 90 %"], out)
    print(f"\nRouted over {', '.join(REGISTERED)} (the default router), rejected by the chosen task at "
          f"{DEFAULT_REJECT_RATE:.0%}\n")
    print_table(*table_routed(feats, blocks))


if __name__ == "__main__":
    main()

"""Does routed prediction tell an image that belongs to no task, and does routing hold across data sets of
different kinds? Measured on frozen features of the packaged backbone, with adaptkit's own code.

Every data set of ``datasets.routing_specs()`` (digits, glyphs A-J, glyphs20 A-T, photos5 and grey5 from
cifar10-mini in colour and in grey, photos2 with two classes, synthetic noise / flat / gradient / stripe images) is
one task: its routing statistics and rejection percentiles come from its training images (train + validation, the
split training makes: 10 %, seed 0) exactly as ``adaptkit train`` computes them
(:class:`adaptkit.inference.routing_stats.Calibration`);
its test images are never seen.

1. Each task alone: the share of its own test images rejected at the default 5 % rate (the false rejections), and
   for every other data set the AUROC of the rejection score (own test images against the other set's) and the
   share rejected. Pairs that share classes (glyphs A-J inside glyphs20; photos2's airplane and ship inside
   photos5) are marked: rejecting them would be wrong.
2. Routed, as ``predict_auto`` does: over digits, glyphs, photos5 and grey5, then over all but one of them, the
   share of each test set rejected (the held-out set, and synthetic images, belong to no task).
3. Other scores, for comparison: the energy and max-softmax of a linear head trained on the task's frozen features
   (what the task's own head would offer), and the z-score of the distance under the covariance pooled over every
   task (the warning measured before, which depends on the other tasks); mean AUROC over the pairs that share no
   class.
4. Task identification (issue 23, part 1): the share of each test set routed to its own task, for the LDA router
   as it was (shrinkage 0.1, covariance pooled over images, a uniform prior over classes); LDA with the
   covariance averaged over tasks, OAS shrinkage and a uniform prior over tasks, its posterior weighed by each
   task's held-out fit (``Router(kind="lda")``); and the default, QDA with each task's covariance estimated by
   empirical Bayes around the pooled one (``Router()``), with and without the fit. On the sets above (on which the
   routers were chosen), then on sets kept out of every choice (``common.data.heldout_specs()``: line drawings,
   blurred photos, grey photos, other CIFAR-10 images) and on CIFAR-10 split into 5 tasks of 2 classes (tasks of
   one data set, which QDA gives one covariance, as routed prediction does for tasks trained on one data set; the
   "no groups" row gives each its own).

5. The rejection score by layer: the per-task Mahalanobis score on the mean patch token after each block against
   the pooled output (AUROC, each broad task against sets of no task of its own).
6. The default router against a joint linear probe over every class of each group, with groups of colour photos of
   two sources (CIFAR-10 beside ``common/photos.py``'s crops, which need scikit-image: ``pip install -e .[bench]``).

    OMP_NUM_THREADS=2 python benchmarks/accuracy/routing_ood.py  # about a minute the first time, then seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from adaptkit.backbone import create_backbone
from adaptkit.data import load_task_data
from adaptkit.inference import DEFAULT_REJECT_RATE, Calibration, Router, RoutingStats, Whitener, accumulate_stats
from adaptkit.models import PACKAGED_BACKBONE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import block_features, lbfgs_linear, print_table  # noqa: E402
from common.data import ROOT, heldout_specs, make_split, routing_specs  # noqa: E402
from common.photos import make_other_photos  # noqa: E402

REGISTERED = ("digits", "glyphs", "photos5", "grey5")
OVERLAP = {frozenset(("glyphs", "glyphs20")), frozenset(("photos2", "photos5"))}  # pairs that share classes
TASK_ID_SETS = [("digits", "glyphs", "photos5"), ("photos5", "grey5"), ("photos2", "glyphs20"),
                ("digits", "glyphs", "photos5", "grey5"), ("digits", "glyphs20", "photos2", "grey5"),
                ("digits", "photos2", "grey5", "synthetic")]
HELDOUT_SETS = [("sketch3", "photos3"), ("blur10", "grey2"), ("photos3", "grey2"),
                ("sketch3", "photos3", "blur10", "grey2"), ("digits", "sketch3", "grey2", "synthetic")]
SPLIT = tuple(f"cifar10 {2 * k}-{2 * k + 1}" for k in range(5))


def _pooled(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor]:
    """(N, d) the frozen pooled features (what routing reads)."""
    return (torch.cat([model(x[k:k + 256]) for k in range(0, len(x), 256)]),)


def _layers(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) the pooled features and (N, depth, d) the mean patch token after each block."""
    parts = [block_features(model, x[k:k + 256]) for k in range(0, len(x), 256)]
    return torch.cat([f["final"] for f in parts]), torch.cat([f["avg"] for f in parts])


@torch.inference_mode()
def dump(path: Path, specs, features=_pooled) -> dict:
    """``features`` (eval transform) and labels of every split of every data set of ``specs()``: per set and split
    a tuple (*features, labels); cached in ``path``."""
    if path.is_file():
        return torch.load(path)
    backbone = create_backbone(PACKAGED_BACKBONE)
    model = backbone.model.eval()
    out = {}
    for name, spec in specs().items():
        data = load_task_data(spec, backbone.data_config, val_fraction=0.1, seed=0, augment="none")
        out[name] = {"classes": data.classes}
        for part in ("train", "val", "test"):
            ds = getattr(data, part)
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            out[name][part] = (*features(model, x), torch.tensor([ds[i][1] for i in range(len(ds))]))
    torch.save(out, path)
    return out


LAYER_TASKS = ("photos5", "grey5", "photos2")  # the broad tasks, whose pooled-output score misses most
LAYER_OTHERS = ("digits", "glyphs", "synthetic", "sketch3", "blur10")


def layer_specs() -> dict[str, str]:
    """The sets of :data:`LAYER_TASKS` and :data:`LAYER_OTHERS`."""
    specs = {**routing_specs(), **heldout_specs()}
    return {name: specs[name] for name in (*LAYER_TASKS, *LAYER_OTHERS)}


def table_layers(layers: dict) -> tuple[list[str], list[list[str]]]:
    depth = layers[LAYER_TASKS[0]]["train"][1].shape[1]
    rows = []
    for layer in ["pooled output (shipped)", *(f"block {k + 1} mean token" for k in range(depth))]:
        pick = (lambda e, part: e[part][0]) if layer.startswith("pooled") else (
            lambda e, part, k=int(layer.split()[1]) - 1: e[part][1][:, k])
        row = [layer]
        for t in LAYER_TASKS:
            e = layers[t]
            entry = {part: (pick(e, part), e[part][2]) for part in ("train", "val")}
            entry["classes"] = e["classes"]
            st = task_stats(entry)
            w = Whitener.of(st.means, st.counts, st.scatter, st.ood_shrinkage)
            own = w.scores(pick(e, "test"))
            row.append(" / ".join(f"{auroc(own, w.scores(pick(layers[u], 'test'))):.2f}" for u in LAYER_OTHERS))
        rows.append(row)
    return ["score read on", *(f"{t}: AUROC vs {', '.join(LAYER_OTHERS)}" for t in LAYER_TASKS)], rows


def split_tasks(entry: dict) -> dict:
    """One data set's features as :data:`SPLIT`: 5 tasks of 2 consecutive classes each, labels 0 and 1."""
    out = {}
    for k, name in enumerate(SPLIT):
        task = {}
        for part in ("train", "val", "test"):
            x, y = entry[part]
            keep = (y == 2 * k) | (y == 2 * k + 1)
            task[part] = (x[keep], y[keep] - 2 * k)
        task["classes"] = entry["classes"][2 * k:2 * k + 2]
        out[name] = task
    return out


def task_stats(entry: dict) -> RoutingStats:
    """The task's statistics and rejection percentiles from its training images (train + validation)."""
    x = torch.cat([entry["train"][0], entry["val"][0]])
    y = torch.cat([entry["train"][1], entry["val"][1]])
    c = len(entry["classes"])
    batches = [(x[i:i + 256], y[i:i + 256]) for i in range(0, len(x), 256)]
    return accumulate_stats(batches, c, Calibration(len(x), c))


def auroc(own: torch.Tensor, other: torch.Tensor) -> float:
    """P(an image of the other set scores higher than one of the task's own), ties counted half."""
    ranks = torch.cat([own, other]).double().argsort().argsort().double() + 1
    above = ranks[len(own):].sum() - len(other) * (len(other) + 1) / 2
    return (above / (len(own) * len(other))).item()


def _pct(x: torch.Tensor) -> str:
    return f"{100 * x.double().mean().item():.0f}"


def table_alone(feats: dict, stats: dict) -> tuple[list[str], list[list[str]]]:
    names = list(feats)
    rows = []
    for t in names:
        w = Whitener.of(stats[t].means, stats[t].counts, stats[t].scatter, stats[t].ood_shrinkage)
        own = w.scores(feats[t]["test"][0])
        row = [t, _pct(stats[t].fit(own) < DEFAULT_REJECT_RATE)]
        for u in names:
            if u == t:
                row.append("")
                continue
            other = w.scores(feats[u]["test"][0])
            mark = "*" if frozenset((t, u)) in OVERLAP else ""
            row.append(f"{auroc(own, other):.2f} / {_pct(stats[t].fit(other) < DEFAULT_REJECT_RATE)}{mark}")
        rows.append(row)
    return ["task", "own test rejected %", *(f"{u}: AUROC / rejected %" for u in names)], rows


def _routed(router: Router, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) each image's chosen task, and whether that task rejects it at the default rate (as predict_auto)."""
    routes = router.route(feats)
    chosen = routes.task_probs.argmax(1)
    return chosen, routes.fit.gather(1, chosen[:, None])[:, 0] < DEFAULT_REJECT_RATE


def table_routed(feats: dict, stats: dict) -> tuple[list[str], list[list[str]]]:
    tests = [*REGISTERED, "synthetic"]
    rows = []
    for held in [None, *REGISTERED]:
        tasks = [t for t in REGISTERED if t != held]
        router = Router([stats[t] for t in tasks])
        row = ["all four" if held is None else f"all but {held}"]
        for name in tests:
            chosen, rejected = _routed(router, feats[name]["test"][0])
            if name in tasks:
                home = chosen == tasks.index(name)
                row.append(f"{_pct(rejected)} (home {_pct(home)}, home and kept {_pct(home & ~rejected)})")
            else:
                row.append(f"**{_pct(rejected)}**")
        rows.append(row)
    return ["tasks routed over", *(f"{n} test images rejected %" for n in tests)], rows


def table_routed_heldout(more: dict, stats: dict) -> tuple[list[str], list[list[str]]]:
    """The held-out sets routed over the four registered tasks: the share rejected and where the rest go."""
    router = Router([stats[t] for t in REGISTERED])
    rows = []
    for name, note in (("sketch3", "line drawings of cat, deer, horse: no task"),
                       ("blur10", "all ten classes, blurred: no task of that kind"),
                       ("photos3", "automobile and bird are photos5's, truck is grey5's in grey"),
                       ("grey2", "dog and frog in grey: grey5's classes")):
        chosen, rejected = _routed(router, more[name]["test"][0])
        where = ", ".join(f"{t} {_pct(chosen == j)}" for j, t in enumerate(REGISTERED) if bool((chosen == j).any()))
        rows.append([name, note, _pct(rejected), where])
    return ["held-out set", "what it is", "rejected %", "routed to (% of its images)"], rows


def _probe(x: torch.Tensor, y: torch.Tensor, classes: int):
    """A linear head trained by L-BFGS on standardised frozen features: (N, d) -> (N, C) logits."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    lin = lbfgs_linear((x - mu) / sd, y, classes, max_iter=200, l2=1e-3)
    return lambda z: lin((z - mu) / sd).detach()


def table_scores(feats: dict, stats: dict) -> tuple[list[str], list[list[str]]]:
    names = list(feats)
    sums: dict[str, list[float]] = {}
    # the warning measured before: distance under the covariance pooled over every task, standardised per task
    old = Router([stats[t] for t in names], kind="lda", shrinkage=0.1, prior="class", pooling="images")
    for t in names:
        entry = feats[t]
        head = _probe(torch.cat([entry["train"][0], entry["val"][0]]), torch.cat([entry["train"][1],
                                                                                 entry["val"][1]]),
                      len(entry["classes"]))
        w = Whitener.of(stats[t].means, stats[t].counts, stats[t].scatter, stats[t].ood_shrinkage)
        j = names.index(t)
        s = stats[t]
        a = old.precision.double() @ (s.scatter.double() / max(s.counts.sum().item() - len(s.counts), 1))
        mean, sd = torch.trace(a).item(), (2 * torch.trace(a @ a)).sqrt().item()

        def pooled_z(f: torch.Tensor, j: int = j, mean: float = mean, sd: float = sd) -> torch.Tensor:
            fp = f.float() @ old.precision
            maha = (fp * f).sum(1, keepdim=True) - 2 * fp @ old.means.T + old._mu_p_mu
            return (maha[:, old.task_of_class == j].min(1).values - mean) / sd

        scores = {"Mahalanobis, the task's own covariance (used)": w.scores,
                  "energy of a linear head (-logsumexp)": lambda f, h=head: -h(f).logsumexp(1),
                  "max softmax of a linear head": lambda f, h=head: -h(f).softmax(1).max(1).values,
                  "z of the distance under the covariance pooled over all 7 tasks (before)": pooled_z}
        for label, fn in scores.items():
            own = fn(entry["test"][0])
            for u in names:
                if u != t and frozenset((t, u)) not in OVERLAP:
                    sums.setdefault(label, []).append(auroc(own, fn(feats[u]["test"][0])))
    return ["score", "mean AUROC", "worst pair"], [[k, f"{sum(v) / len(v):.3f}", f"{min(v):.3f}"]
                                                   for k, v in sums.items()]


def table_task_id(feats: dict, stats: dict, sets: list[tuple[str, ...]]) -> tuple[list[str], list[list[str]]]:
    routers = {"lda before (0.1, images, class prior)": {"kind": "lda", "shrinkage": 0.1, "prior": "class",
                                                         "pooling": "images", "by_fit": False},
               "lda (OAS, tasks, task prior) x fit": {"kind": "lda"},
               "qda, no fit": {"by_fit": False}, "**qda (default)** x fit": {}}
    rows = []
    for tasks in sets:
        # each set's data set, as routed prediction reads it from the files: SPLIT's tasks share one
        groups = ["cifar10" if t in SPLIT else t for t in tasks]
        kinds = {**routers, "qda, no groups (each task its own covariance)": {"groups": None}} if tasks == SPLIT \
            else routers
        for label, kw in kinds.items():
            router = Router([stats[t] for t in tasks], **{"groups": groups, **kw})
            per = [100 * (router.route(feats[t]["test"][0]).task_probs.argmax(1) == j).double().mean().item()
                   for j, t in enumerate(tasks)]
            total = sum(p * len(feats[t]["test"][1]) for p, t in zip(per, tasks, strict=True)) / sum(
                len(feats[t]["test"][1]) for t in tasks)
            rows.append([" + ".join(tasks), label, f"{sum(per) / len(per):.1f}", f"{total:.1f}",
                         ", ".join(f"{t} {p:.0f}" for t, p in zip(tasks, per, strict=True))])
    return ["tasks", "router", "mean over tasks %", "over images %", "each task's test images routed home %"], rows


# colour photos of two CIFAR-10 pools with disjoint classes; beside crops of six photos of another source
PHOTO_PAIRS = [("photos2", "photos3"), ("photos2", "photos3", "grey2"), ("photos5", "other"), ("photos3", "other"),
               ("photos2", "photos3", "other")]


def table_ceiling(feats: dict, stats: dict, sets: list[tuple[str, ...]]) -> tuple[list[str], list[list[str]]]:
    """Per group, the default router against a joint linear probe over every class of the group (L-BFGS on the
    pooled features of all its training images at once): task identified, and class-incremental accuracy (the
    router's: the chosen task's own linear probe on the frozen features, right only when the task is)."""
    rows = []
    for tasks in sets:
        groups = ["cifar10" if t in SPLIT else t for t in tasks]
        router = Router([stats[t] for t in tasks], groups=groups)
        offsets = [sum(len(feats[u]["classes"]) for u in tasks[:j]) for j in range(len(tasks))]
        train = [torch.cat([feats[t]["train"][0], feats[t]["val"][0]]) for t in tasks]
        labels = [torch.cat([feats[t]["train"][1], feats[t]["val"][1]]) + o for t, o in zip(tasks, offsets,
                                                                                                strict=True)]
        joint = _probe(torch.cat(train), torch.cat(labels), offsets[-1] + len(feats[tasks[-1]]["classes"]))
        owns = [_probe(x, y - o, len(feats[t]["classes"])) for x, y, o, t in zip(train, labels, offsets, tasks,
                                                                                 strict=True)]
        task_of = torch.cat([torch.full((len(feats[t]["classes"]),), j) for j, t in enumerate(tasks)])
        n = r_id = r_cil = j_id = j_cil = 0
        for j, t in enumerate(tasks):
            x, y = feats[t]["test"]
            chosen = router.route(x).task_probs.argmax(1)
            right = torch.zeros(len(y), dtype=torch.bool)
            for k in range(len(tasks)):
                rows_k = chosen == k
                if rows_k.any() and k == j:
                    right[rows_k] = owns[k](x[rows_k]).argmax(1) == y[rows_k]
            pred = joint(x).argmax(1)
            n, r_id, r_cil = n + len(y), r_id + int((chosen == j).sum()), r_cil + int(right.sum())
            j_id, j_cil = j_id + int((task_of[pred] == j).sum()), j_cil + int((pred == y + offsets[j]).sum())
        pct = lambda a, n=n: 100 * a / n  # noqa: E731
        rows.append([" + ".join(tasks), f"{pct(r_id):.1f}", f"{pct(j_id):.1f}", f"{pct(r_id) - pct(j_id):+.1f}",
                     f"{pct(r_cil):.1f}", f"{pct(j_cil):.1f}", f"{pct(r_cil) - pct(j_cil):+.1f}"])
    return ["tasks", "router: task id %", "joint probe: task id %", "gap", "router + task probe: CIL %",
            "joint probe: CIL %", "gap"], rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, default=ROOT / "routing-features.pt",
                        help="the cached frozen features (made if missing)")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    feats = dump(args.features, routing_specs)
    more = dump(args.features.with_name("routing-heldout-features.pt"),
                lambda: {**heldout_specs(), "split": f"folder:{make_split()}"})
    more = {**{k: v for k, v in more.items() if k != "split"}, **split_tasks(more["split"]),
            **dump(args.features.with_name("routing-other-features.pt"),  # common/photos.py: another source
                   lambda: {"other": f"folder:{make_other_photos(ROOT)}"})}
    stats = {t: task_stats(e) for t, e in feats.items()}
    more_stats = {t: task_stats(e) for t, e in more.items()}
    sizes = ", ".join(f"{t} {len(e['train'][1]) + len(e['val'][1])}/{len(e['test'][1])}" for t, e in feats.items())
    print(f"{PACKAGED_BACKBONE}, frozen pooled features; training/test images: {sizes}\n")
    print(f"1. Each task alone: rejection at {DEFAULT_REJECT_RATE:.0%} (* = the two sets share classes)\n")
    print_table(*table_alone(feats, stats))
    print("\n2. Routed (default qda), rejected by the chosen task on the pooled score (the score before issue 37; "
          "rejection.py measures the one shipped); bold: the set belongs to no task routed over\n")
    print_table(*table_routed(feats, stats))
    print("\n   sets kept out of every choice, routed over the same four tasks\n")
    print_table(*table_routed_heldout(more, stats))
    print("\n3. Scores compared: AUROC over the pairs that share no class\n")
    print_table(*table_scores(feats, stats))
    print("\n4. Task identification, on the sets the routers were chosen on\n")
    print_table(*table_task_id(feats, stats, TASK_ID_SETS))
    both, both_stats = {**feats, **more}, {**stats, **more_stats}
    print("\n   on sets kept out of every choice, and CIFAR-10 in 5 tasks of 2 classes\n")
    print_table(*table_task_id(both, both_stats, [*HELDOUT_SETS, SPLIT]))
    print("\n6. The default router against its ceiling, a joint linear probe over every class of the group (over "
          "images)\n")
    print_table(*table_ceiling(both, both_stats, [*TASK_ID_SETS, *HELDOUT_SETS, SPLIT, *PHOTO_PAIRS]))
    print("\n5. The rejection score by layer (shipped since issue 37, combined over blocks: rejection.py)\n")
    print_table(*table_layers(dump(args.features.with_name("routing-layer-features.pt"), layer_specs, _layers)))


if __name__ == "__main__":
    main()

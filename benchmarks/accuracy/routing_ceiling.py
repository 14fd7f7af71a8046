"""Section 6 of ``routing_ood.py``: the default router against its ceiling, a joint linear probe fitted on all of a
group's training images at once (issue 37), and for photos5 + other, the group beyond the goal, where its gap comes
from (other's test crops from the training crops' part of each photo or from the rest, ``common/photos.py``).
Run by ``routing_ood.py``, on its cached features.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from adaptkit.inference import Router

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import lbfgs_linear  # noqa: E402


def probe(x: torch.Tensor, y: torch.Tensor, classes: int):
    """A linear head trained by L-BFGS on standardised frozen features: (N, d) -> (N, C) logits."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    lin = lbfgs_linear((x - mu) / sd, y, classes, max_iter=200, l2=1e-3)
    return lambda z: lin((z - mu) / sd).detach()


# colour photos of two CIFAR-10 pools with disjoint classes; beside crops of six photos of another source
PHOTO_PAIRS = [("photos2", "photos3"), ("photos2", "photos3", "grey2"), ("photos5", "other"), ("photos3", "other"),
               ("photos2", "photos3", "other")]


def table_ceiling(feats: dict, stats: dict, sets: list[tuple[str, ...]], one_data_set: tuple[str, ...] = ()
                  ) -> tuple[list[str], list[list[str]]]:
    """Per group, the default router against a joint linear probe over every class of the group (L-BFGS on the
    pooled features of all its training images at once): task identified, and class-incremental accuracy (the
    router's: the chosen task's own linear probe on the frozen features, right only when the task is). Tasks of
    ``one_data_set`` share one covariance, as routed prediction gives tasks trained on one data set."""
    rows = []
    for tasks in sets:
        groups = ["one data set" if t in one_data_set else t for t in tasks]
        router = Router([stats[t] for t in tasks], groups=groups)
        offsets = [sum(len(feats[u]["classes"]) for u in tasks[:j]) for j in range(len(tasks))]
        train = [torch.cat([feats[t]["train"][0], feats[t]["val"][0]]) for t in tasks]
        labels = [torch.cat([feats[t]["train"][1], feats[t]["val"][1]]) + o for t, o in zip(tasks, offsets,
                                                                                                strict=True)]
        joint = probe(torch.cat(train), torch.cat(labels), offsets[-1] + len(feats[tasks[-1]]["classes"]))
        owns = [probe(x, y - o, len(feats[t]["classes"])) for x, y, o, t in zip(train, labels, offsets, tasks,
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


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value of b against c discordant pairs."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n) if n else 1.0


def table_shift(feats: dict, stats: dict) -> tuple[list[str], list[list[str]]]:
    """photos5 + other, its test crops from the part of each photo the training crops come from or from the rest:
    the share of each task's test images routed home by ``qda`` (the default), ``lda`` and the joint probe, and
    the exact McNemar p-value of the default router against the probe (images one gets right and the other not)."""
    rows = []
    for other, where in (("other-same", "the training crops' part (left 60 %)"), ("other", "the rest (right 40 %)")):
        tasks = ("photos5", other)
        train = [torch.cat([feats[t]["train"][0], feats[t]["val"][0]]) for t in tasks]
        labels = [torch.cat([feats[t]["train"][1], feats[t]["val"][1]]) + o for t, o in zip(tasks, (0, 5),
                                                                                            strict=True)]
        joint = probe(torch.cat(train), torch.cat(labels), 5 + len(feats[other]["classes"]))
        routers = [Router([stats[t] for t in tasks], kind=kind) for kind in ("qda", "lda")]
        homes = [*(lambda x, r=r: r.route(x).task_probs.argmax(1) for r in routers),
                 lambda x, joint=joint: (joint(x).argmax(1) >= 5).long()]
        right = dict(zip(("qda", "lda", "joint probe"), ([home(feats[t]["test"][0]) == j for j, t in enumerate(tasks)]
                                                         for home in homes), strict=True))
        row = [where]
        for ok in right.values():
            total = 100 * torch.cat(ok).double().mean().item()
            row.append(f"{total:.1f} ({', '.join(f'{100 * o.double().mean().item():.0f}' for o in ok)})")
        q, jp = torch.cat(right["qda"]), torch.cat(right["joint probe"])
        b, c = int((q & ~jp).sum()), int((~q & jp).sum())
        row.append(f"{b} / {c}, p = {mcnemar(b, c):.2f}")
        rows.append(row)
    return ["other's test crops from", "qda (default): task id % (photos5, other)", "lda", "joint probe",
            "qda right & probe wrong / the reverse"], rows

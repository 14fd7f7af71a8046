"""Routers compared offline on a registry of class-incremental tasks (issue 9: CIFAR-10 in 5 tasks of 2 classes).

One pass dumps, for every task's training images (train + val, eval transform, the images routing statistics are
collected from) and test images: the frozen backbone's pooled features and the class token and mean patch token
after every block; and each task's adapted pooled features of its own training images and of every test image. The
dump is kept in a ``.pt`` file beside the registry, so the table is then computed in seconds. Every router is
measured on the same images and the same adapters: "task-id" is the share of test images routed to their own task,
"class-incr." the share routed home *and* right under their task's adapter (what ``adaptkit continual`` reports).

    python examples/class_incremental.py --dataset folder:$HOME/.cache/adaptkit/cifar10 --tasks 5 --epochs 2 \\
        --limit-train 2000 --limit-eval 400 --registry /tmp/cil/registry.db
    python benchmarks/accuracy/routing_offline.py --registry /tmp/cil/registry.db --limit-eval 400
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import block_features, lbfgs_linear
from torch.nn.functional import normalize, one_hot

from adaptkit.data import TransformedSubset, load_task_data
from adaptkit.inference import DEFAULT_SHRINKAGE, Predictor, Router, accumulate_stats, frozen, task_order
from adaptkit.registry import Registry


def _stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [ds[i] for i in range(len(ds))]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def _batched(fn, x: torch.Tensor, size: int = 256) -> dict[str, torch.Tensor] | torch.Tensor:
    parts = [fn(x[i:i + size]) for i in range(0, len(x), size)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if isinstance(parts[0], dict) else torch.cat(parts)


@torch.inference_mode()
def dump(registry: str, limit_eval: int | None) -> dict:
    """Every feature the routers below read, for the tasks of ``registry`` in the order they were added."""
    reg = Registry(registry)
    predictor = Predictor(reg, device="cpu")
    tasks = [predictor.load(r) for r in task_order(reg)]
    trunk = tasks[0].host.backbone.model
    out: dict = {"refs": [t.ref for t in tasks], "tasks": []}
    images = []
    for t in tasks:
        recipe = reg.get_version(t.ref).train.get("recipe", {})
        data = load_task_data(t.meta.dataset, t.host.backbone.data_config, classes=t.meta.classes, augment=False,
                              seed=recipe.get("seed", 0), val_fraction=recipe.get("val_fraction", 0.1),
                              limit_train=recipe.get("limit_train"), limit_eval=limit_eval)
        train = TransformedSubset(data.val.source, sorted([*data.train.indices, *data.val.indices]),
                                  data.val.transform)
        images.append((*_stack(train), *_stack(data.test)))
    every_test = torch.cat([i[2] for i in images])
    for t, (xtr, ytr, xte, yte) in zip(tasks, images, strict=True):
        entry = {"ytr": ytr, "yte": yte, "head_w": t.model.head.weight.clone(), "head_b": t.model.head.bias.clone()}
        with frozen(trunk):
            entry.update({f"{k}_tr": v for k, v in _batched(lambda x: block_features(trunk, x), xtr).items()})
            entry.update({f"{k}_te": v for k, v in _batched(lambda x: block_features(trunk, x), xte).items()})
            entry["flip_te"] = _batched(lambda x: trunk(x.flip(3)), xte)
        t.model.ctx.active = t.model.slot
        entry["adapted_tr"], entry["adapted_te"] = _batched(trunk, xtr), _batched(trunk, every_test)
        t.model.ctx.active = None
        out["tasks"].append(entry)
    return out


class Bench:
    """The dumped features as float64 tensors over every task, and the scoring every row shares."""

    def __init__(self, dumped: dict) -> None:
        self.tasks = dumped["tasks"]
        self.n = n = len(self.tasks)
        self.per = [len(t["head_b"]) for t in self.tasks]
        offsets = [sum(self.per[:i]) for i in range(n)]
        self.C = sum(self.per)
        self.ytr = torch.cat([t["ytr"] + o for t, o in zip(self.tasks, offsets, strict=True)])
        self.yte = torch.cat([t["yte"] + o for t, o in zip(self.tasks, offsets, strict=True)])
        self.task_of_class = torch.cat([torch.full((c,), i) for i, c in enumerate(self.per)])
        self.tte = self.task_of_class[self.yte]
        # each task's adapter on every test image: (N, C_t) logits, and whether the own task's answer is right
        self.adapter_logits = [t["adapted_te"].double() @ t["head_w"].double().T + t["head_b"].double()
                               for t in self.tasks]
        own = torch.stack([self.adapter_logits[t][i].argmax() for i, t in enumerate(self.tte.tolist())])
        self.right_given = own + torch.tensor(offsets)[self.tte] == self.yte

    def cat(self, key: str) -> torch.Tensor:
        return torch.cat([t[key] for t in self.tasks]).double()

    def row(self, task_scores: torch.Tensor) -> tuple[float, float]:
        """(N, T) task scores -> (task-id, class-incremental accuracy) in %."""
        home = task_scores.argmax(1) == self.tte
        return 100 * home.double().mean().item(), 100 * (home & self.right_given).double().mean().item()

    def to_tasks(self, class_scores: torch.Tensor) -> torch.Tensor:
        """(N, C) class log-scores -> (N, T) log posterior mass of each task's classes."""
        logp = class_scores.log_softmax(1)
        return torch.stack([logp[:, self.task_of_class == t].logsumexp(1) for t in range(self.n)], 1)

    def router(self, kind: str, xtr: torch.Tensor, xte: torch.Tensor, shrinkage: float = DEFAULT_SHRINKAGE
               ) -> torch.Tensor:
        """(N, C) class scores of adaptkit's own :class:`Router` (``lda``, ``ncm``) over every class, on any
        features: the statistics of all the training images as one task's."""
        stats = accumulate_stats([(xtr, self.ytr)], self.C)
        return Router([stats], kind, shrinkage).scores(xte).double()

    def lda(self, xtr: torch.Tensor, xte: torch.Tensor, shrinkage: float = DEFAULT_SHRINKAGE) -> torch.Tensor:
        return self.router("lda", xtr, xte, shrinkage)

    def ncm(self, xtr: torch.Tensor, xte: torch.Tensor) -> torch.Tensor:
        return self.router("ncm", xtr, xte)

    def ranpac(self, xtr: torch.Tensor, xte: torch.Tensor, m: int, lam: float) -> torch.Tensor:
        """RanPAC: a seeded random projection to ``m`` dims + ReLU, ridge onto one-hot targets (lambda relative to
        the mean diagonal of H^T H)."""
        w = torch.randn(xtr.shape[1], m, generator=torch.Generator().manual_seed(0)).double()
        htr, hte = torch.relu(xtr @ w), torch.relu(xte @ w)
        gram = htr.T @ htr
        weight = torch.linalg.solve(gram + lam * gram.diagonal().mean() * torch.eye(m).double(),
                                    htr.T @ one_hot(self.ytr, self.C).double())
        return hte @ weight

    def adapted(self, shrinkage: float = 0.1) -> dict[str, torch.Tensor]:
        """EASE-style typicality of every test image in each task's own adapted space, from that task's own
        training images only: (N, T) scores, higher is more typical."""
        out: dict[str, list[torch.Tensor]] = {"mahalanobis": [], "gaussian log-likelihood": [], "cosine": [],
                                              "energy (logsumexp of the head)": []}
        for t, entry in enumerate(self.tasks):
            a, y, z = entry["adapted_tr"].double(), entry["ytr"], entry["adapted_te"].double()
            means = torch.stack([a[y == c].mean(0) for c in range(self.per[t])])
            diff = a - means[y]
            cov = diff.T @ diff / (len(a) - len(means))
            cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(a.shape[1]).double()
            dz = z[:, None, :] - means[None]
            maha = torch.einsum("bcd,de,bce->bc", dz, torch.linalg.inv(cov), dz)
            out["mahalanobis"].append(-maha.min(1).values)
            out["gaussian log-likelihood"].append((-0.5 * maha).logsumexp(1) - 0.5 * torch.linalg.slogdet(cov)[1])
            out["cosine"].append((normalize(z, dim=1) @ normalize(means, dim=1).T).max(1).values / 0.05)
            out["energy (logsumexp of the head)"].append(self.adapter_logits[t].logsumexp(1))
        return {k: torch.stack(v, 1) for k, v in out.items()}


def _top(prior: torch.Tensor, k: int) -> torch.Tensor:
    """0 on each image's k most likely tasks under ``prior``, -inf elsewhere."""
    return torch.full_like(prior, -math.inf).scatter(1, prior.topk(k, 1).indices, 0.0)


def table(b: Bench) -> list[tuple[str, str, float, float]]:
    """(router, what it costs beyond the default, task-id %, class-incr. %) rows."""
    ftr, fte = b.cat("final_tr"), b.cat("final_te")
    d = ftr.shape[1]
    scatter_kb = d * (d + 1) // 2 * 4 / 1e3
    frozen_lda = b.to_tasks(b.lda(ftr, fte))
    simplecil = 100 * (b.ncm(ftr, fte).argmax(1) == b.yte).double().mean().item()
    rows = [("SimpleCIL (cosine NCM, frozen; a 10-way classifier, no adapters)", "none", math.nan, simplecil),
            ("ncm on frozen features", "none", *b.row(b.to_tasks(b.ncm(ftr, fte)))),
            ("**lda on frozen features (default)**", f"{scatter_kb:.0f} KB/task", *b.row(frozen_lda))]
    for s in (0.01, 0.3):
        rows.append((f"lda, shrinkage {s}", "", *b.row(b.to_tasks(b.lda(ftr, fte, s)))))
    cls_tr, cls_te, avg_tr, avg_te = b.cat("cls_tr"), b.cat("cls_te"), b.cat("avg_tr"), b.cat("avg_te")
    for k in (2, len(b.tasks[0]["cls_tr"][0])):
        xtr = torch.cat([cls_tr[:, -k:].flatten(1), avg_tr[:, -k:].flatten(1)], 1)
        xte = torch.cat([cls_te[:, -k:].flatten(1), avg_te[:, -k:].flatten(1)], 1)
        kb = xtr.shape[1] * (xtr.shape[1] + 1) // 2 * 4 / 1e3
        rows.append((f"lda on class + mean tokens of the last {k} blocks ({xtr.shape[1]} dims)", f"{kb:.0f} KB/task",
                     *b.row(b.to_tasks(b.lda(xtr, xte)))))
    for m in (500, 1000, 2000):
        for lam in (0.01, 0.1):
            mb = m * (m + 1) // 2 * 4 / 1e6
            rows.append((f"RanPAC M={m}, lambda {lam}", f"{mb:.1f} MB/task",
                         *b.row(b.to_tasks(b.ranpac(ftr, fte, m, lam)))))
    rows.append(("lda, test-time flip (mean of 2 frozen features)", "1 more frozen pass",
                 *b.row(b.to_tasks(b.lda(ftr, (fte + b.cat("flip_te")) / 2)))))
    for name, score in b.adapted().items():
        rows.append((f"adapted spaces (EASE-style), {name}", "T adapted passes", *b.row(score)))
        rows.append(("  same, among the frozen lda's top 2", "2 adapted passes", *b.row(score + _top(frozen_lda, 2))))
        z = (score - score.mean()) / score.std()
        best = max((b.row(frozen_lda + a * z) + (a,) for a in (0.1, 0.3, 1.0)), key=lambda r: r[1])
        rows.append((f"  frozen lda log-posterior + {best[2]} x standardised score (weight and scale picked on the "
                     "test images: optimistic)",
                     "T adapted passes", best[0], best[1]))
    return rows


def _probe(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, classes: int) -> float:
    """Accuracy (%) of a linear classifier trained by L-BFGS on standardised features."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = ((xtr - mu) / sd).float(), ((xte - mu) / sd).float()
    lin = lbfgs_linear(xtr, ytr, classes, max_iter=300, l2=1e-4)
    with torch.no_grad():
        return 100 * (lin(xte).argmax(1) == yte).double().mean().item()


def bounds(b: Bench) -> list[tuple[str, float]]:
    """What no router of these features is likely to pass: classifiers that see every task's images at once."""
    ftr, fte = b.cat("final_tr"), b.cat("final_te")
    sim = normalize(fte, dim=1) @ normalize(ftr, dim=1).T
    idx = sim.topk(50, 1).indices
    votes = torch.zeros(len(fte), b.C).double().scatter_add_(1, b.ytr[idx], torch.ones_like(idx).double())
    knn = 100 * (votes.argmax(1) == b.yte).double().mean().item()
    # every adapted space on every image exists for the test images only: train on one half, test on the other
    half = torch.randperm(len(fte), generator=torch.Generator().manual_seed(0))
    a, z = half[:len(half) // 2], half[len(half) // 2:]
    both = torch.cat([fte, *(t["adapted_te"].double() for t in b.tasks)], 1)
    return [("joint linear probe on frozen features (every task's training images at once)",
             _probe(ftr, b.ytr, fte, b.yte, b.C)),
            ("50-nearest-neighbour vote on frozen features", knn),
            ("linear probe on frozen features, fitted on half the test images, tested on the other half",
             _probe(fte[a], b.yte[a], fte[z], b.yte[z], b.C)),
            ("same on frozen + every task's adapted features concatenated (EASE's space, oracle)",
             _probe(both[a], b.yte[a], both[z], b.yte[z], b.C)),
            ("task given (each test image through its own task; not 10-way)",
             100 * b.right_given.double().mean().item())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", required=True, help="a registry made by examples/class_incremental.py")
    parser.add_argument("--limit-eval", type=int, help="test images per task, as given to the example")
    parser.add_argument("--features", help="the dump (default: features.pt beside the registry; made if missing)")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    path = Path(args.features or Path(args.registry).with_name("features.pt"))
    if not path.exists():
        torch.save(dump(args.registry, args.limit_eval), path)
    dumped = torch.load(path)
    b = Bench(dumped)
    print(f"{b.n} tasks ({', '.join(dumped['refs'])}), {len(b.yte)} test images, {len(b.ytr)} training images\n")
    print("| router | costs beyond the default | task-id % | class-incr. % |\n| --- | --- | --- | --- |")
    for name, cost, tid, cil in table(b):
        print(f"| {name} | {cost} | {'' if math.isnan(tid) else f'{tid:.1f}'} | {cil:.1f} |")
    print("\n| 10-way classifier (a bound, not a router) | accuracy % |\n| --- | --- |")
    for name, acc in bounds(b):
        print(f"| {name} | {acc:.1f} |")


if __name__ == "__main__":
    main()

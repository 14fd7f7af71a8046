"""Can the routing statistics tell an image that belongs to no task? A measurement, not a feature.

The router's confidence is the posterior over the candidate tasks, so an image unlike all of them still goes to the
likeliest one. This checks whether the statistics each version stores (class means, counts, within-class scatter)
can flag such an image. For every task t the Mahalanobis distance (under the router's pooled, shrunk precision P) of
an image of t to its class mean has, for Gaussian features, mean tr(P S_t) and variance 2 tr((P S_t)^2), S_t the
task's within-class covariance; an image's z-score is its distance to the nearest class of t so standardised,
minimised over tasks. Frozen features of the packaged backbone on the four data sets of ``datasets.py`` (one task
each, all training images), each data set held out in turn, and as photos of no task the CIFAR-10 test images of
``../shared/data/cifar10-mini`` whose classes ``cifar5`` lacks; it prints the median z and the share above 3 for
every test set.

    OMP_NUM_THREADS=1 python benchmarks/routing_ood.py      # about a minute; emoji needs its Debian packages
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from adaptkit.backbone import create_backbone
from adaptkit.data import load_task_data
from adaptkit.models import PACKAGED_BACKBONE
from adaptkit.routing import Router, RoutingStats, accumulate_stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402
from datasets import CIFAR5, SHARED, specs  # noqa: E402

THRESHOLD = 3.0


@torch.inference_mode()
def features(model: torch.nn.Module, data) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) pooled frozen features of a split in the eval transform, and its (N,) labels."""
    x = torch.stack([data[i][0] for i in range(len(data))])
    return torch.cat([model(x[k:k + 256]) for k in range(0, len(x), 256)]), torch.tensor([data[i][1]
                                                                                      for i in range(len(data))])


def calibration(router: Router, stats: list[RoutingStats]) -> list[tuple[float, float]]:
    """(mean, standard deviation) of a task's own images' distance to their class mean, in closed form."""
    precision, out = router.precision.double(), []
    for s in stats:
        a = precision @ (s.scatter.double() / max(s.counts.sum().item() - len(s.counts), 1))
        out.append((torch.trace(a).item(), (2 * torch.trace(a @ a)).sqrt().item()))
    return out


def zscores(router: Router, cal: list[tuple[float, float]], f: torch.Tensor) -> torch.Tensor:
    """(B,) the most typical task's z-score of each image."""
    fp = f.float() @ router.precision
    maha = (fp * f).sum(1, keepdim=True) - 2 * fp @ router.means.T + router._mu_p_mu  # (B, C)
    return torch.stack([(maha[:, router.task_of_class == t].min(1).values - m) / s
                        for t, (m, s) in enumerate(cal)], 1).min(1).values


def main() -> None:
    backbone = create_backbone(PACKAGED_BACKBONE)
    model = backbone.model.eval()
    train, test = {}, {}
    for name, spec in specs(emoji=True).items():
        data = load_task_data(spec, backbone.data_config, val_fraction=0.0, seed=0, augment="none")
        test[name] = features(model, data.test)[0]
        train[name] = accumulate_stats([features(model, data.train)], len(data.classes))
    photos = load_task_data(f"folder:{SHARED / 'cifar10-mini'}", backbone.data_config, val_fraction=0.0, seed=0,
                            augment="none")
    f, y = features(model, photos.test)
    test["other CIFAR-10 photos"] = f[torch.tensor([photos.classes[i] not in CIFAR5 for i in y.tolist()])]
    rows = []
    for held in [None, *train]:
        tasks = [n for n in train if n != held]
        router = Router([train[n] for n in tasks])
        cal = calibration(router, [train[n] for n in tasks])
        for name, f in test.items():
            z = zscores(router, cal, f)
            rows.append([f"all but {held}" if held else "all four", name, "task" if name in tasks else "no task",
                         f"{z.median():.1f}", f"{100 * (z > THRESHOLD).float().mean():.0f} %"])
    print(f"{PACKAGED_BACKBONE}, frozen pooled features; LDA router (shrinkage 0.1); z of the most typical task\n")
    print_table(["tasks routed over", "test images", "theirs", "median z", f"z > {THRESHOLD:g}"], rows)


if __name__ == "__main__":
    main()

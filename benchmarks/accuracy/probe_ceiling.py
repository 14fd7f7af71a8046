"""What the frozen features already give: a converged logistic regression on the packaged backbone's features.

For each data set of ``benchmarks/common/data.py`` it runs the frozen backbone once over the training and test images
(no augmentation), fits scikit-learn's L2 logistic regression (L-BFGS to convergence) on the pooled pre-logits
features, on each block's output (class token and mean patch token) and on the standardised grey pixels, and
prints train and test top-1. It answers two questions before any recipe is tuned: can the task be learnt at all
from these images (train and test accuracy of the probes), and how far a default linear probe trained by adaptkit is
from a converged one (so how much of an adapter's lead over it is the probe being undertrained).

    OMP_NUM_THREADS=1 python benchmarks/accuracy/probe_ceiling.py             # the three data sets, about a minute
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from adaptkit.backbone import create_backbone
from adaptkit.data import load_task_data
from adaptkit.models import PACKAGED_BACKBONE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import block_features, print_table  # noqa: E402
from common.data import specs  # noqa: E402


@torch.no_grad()
def features(model: torch.nn.Module, data) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled pre-logits features, every block's (class token, mean patch token), grey pixels; and the labels."""
    x = torch.stack([data[i][0] for i in range(len(data))])  # (N, 3, H, W), the eval transform
    labels = np.array([data[i][1] for i in range(len(data))])
    feats = block_features(model, x)
    out = {f"block {b + 1}": torch.cat([feats["cls"][:, b], feats["avg"][:, b]], 1).numpy()
           for b in range(len(model.blocks))}
    out["pooled (what the linear probe sees)"] = feats["final"].numpy()
    grey = x.mean(1).flatten(1)
    out["grey pixels"] = ((grey - grey.mean(1, keepdim=True)) / (grey.std(1, keepdim=True) + 1e-6)).numpy()
    return out, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "glyphs", "cifar5"])
    args = parser.parse_args()
    backbone = create_backbone(PACKAGED_BACKBONE)
    model = backbone.model.eval()
    rows = []
    for name in args.datasets:
        data = load_task_data(specs()[name], backbone.data_config, val_fraction=0.0, seed=0, augment="none")
        (train, y_train), (test, y_test) = features(model, data.train), features(model, data.test)
        for kind in train:
            probe = LogisticRegression(max_iter=5000).fit(train[kind], y_train)
            rows.append([name, kind, f"{100 * probe.score(train[kind], y_train):.1f}",
                         f"{100 * probe.score(test[kind], y_test):.1f}"])
    print(f"{PACKAGED_BACKBONE}, frozen; L2 logistic regression (C=1) fitted to convergence; top-1 (%)\n")
    print_table(["data set", "features", "train", "test"], rows)


if __name__ == "__main__":
    main()

"""Routed prediction that says "none of these tasks": rejection percentiles calibrated at training time on held-out
images, stored with the routing statistics, read back, applied by predict_auto and the command line.

Pico backbones (random weights) and real images: the bundled digits and ../shared/data/cifar10-mini.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from adaptkit.artifacts import load_adapter
from adaptkit.data import load_task_data
from adaptkit.errors import ConfigError
from adaptkit.inference import (
    DEFAULT_REJECT_RATE,
    OOD_SHRINKAGE,
    ROUTING_PREFIX,
    Calibration,
    Predictor,
    Router,
    RoutingStats,
    Whitener,
    accumulate_stats,
    fit_routing,
    split_state,
)
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, train
from tests.conftest import PICO

CONFIG = TrainConfig(epochs=1, batch_size=64, limit_train=400, limit_eval=100, lr=3e-3, num_workers=0)


def _train(reg: Registry, spec: str, task: str, method: str, **kw):
    return train(spec, task=task, backbone=PICO, pretrained=False, method=method, config=CONFIG, registry=reg,
                 download=False, **kw)


@pytest.fixture(scope="module")
def reg(tmp_path_factory, cifar_mini) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("ood") / "reg.db")
    _train(reg, "digits", "digits", "linear")  # the statistics from the cached features
    _train(reg, f"folder:{cifar_mini}", "photos", "adapter", classes="airplane,automobile,ship,truck")  # a pass
    return reg


@pytest.fixture(scope="module")
def tests_of(reg, cifar_mini):
    """Test images (eval transform, as tensors) of each task, and CIFAR photos of classes no task has."""
    dc = Predictor(reg, device="cpu").load("digits").host.backbone.data_config
    digits = load_task_data("digits", dc, augment=False).test
    photos = load_task_data(f"folder:{cifar_mini}", dc, augment=False, classes="airplane,automobile,ship,truck").test
    return {name: [ds[i][0] for i in range(min(len(ds), 100))] for name, ds in (("digits", digits), ("photos", photos))}


def _foreign() -> list[Image.Image]:
    """Uniform noise: images of no data set."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]


def _flat() -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), c) for c in ((0, 0, 0), (255, 255, 255), (200, 30, 30), (128, 128, 128))]


def _stats(reg: Registry, ref: str) -> RoutingStats:
    row = reg.get_version(ref)
    return split_state(load_adapter(reg.path_of(row), sha256=row.sha256)[0])[1]


def test_training_stores_rejection_percentiles_that_read_back(reg):
    for ref in ("digits", "photos"):
        stats = _stats(reg, ref)
        q = stats.ood_quantiles
        assert stats.calibrated and q.shape == (101,) and bool((q.diff() >= 0).all()) and q[0] > 0
        assert stats.ood_shrinkage == OOD_SHRINKAGE
        assert stats.threshold(DEFAULT_REJECT_RATE) == pytest.approx(q[95].item(), rel=1e-6)  # the 95th percentile
        assert stats.threshold(0.01) == pytest.approx(q[99].item(), rel=1e-6)
        back = RoutingStats.from_tensors(stats.to_tensors())
        assert torch.equal(back.ood_quantiles, q) and back.ood_shrinkage == stats.ood_shrinkage
        assert stats.fit(torch.tensor([0.0, q[50].item(), q[100].item() * 2])).tolist() == pytest.approx([1, .5, 0])


def test_own_test_images_are_kept_and_foreign_ones_rejected(reg, tests_of):
    predictor = Predictor(reg, device="cpu")
    for task, images in (("digits", tests_of["digits"]), ("photos", tests_of["photos"])):
        results = predictor.predict_auto(images, topk=2)
        home = [r for r in results if r.task == f"{task}@1"]
        assert len(home) >= 0.9 * len(images)
        assert sum(r.rejected for r in home) <= 0.15 * len(home)  # calibrated at 5 % on held-out images
        assert all(r.fit is not None and 0 <= r.fit <= 1 and r.rejected == (r.fit < 0.05) for r in results)
    foreign = predictor.predict_auto(_foreign(), topk=2)
    assert all(r.rejected and r.fit < 0.05 for r in foreign)
    assert sum(r.rejected for r in predictor.predict_auto(_flat())) >= 3  # of 4 flat colours (random features)
    assert all(r.task in ("digits@1", "photos@1") and len(r.predictions) == 2 for r in foreign)  # the nearest task
    kept = predictor.predict_auto(_foreign(), topk=2, accept_all=True)
    assert not any(r.rejected for r in kept)
    assert [(r.task, r.predictions, r.fit) for r in kept] == [(r.task, r.predictions, r.fit) for r in foreign]
    assert not any(r.rejected for r in predictor.route(_foreign(), accept_all=True))
    assert all(r.rejected for r in predictor.route(_foreign()))


def test_a_data_set_no_task_was_trained_on_is_rejected(reg, tests_of):
    """Photos routed among the digits task alone. (Not the converse: grey digits lie within the spread of the photos'
    features, here as on the packaged backbone; see benchmarks/accuracy/routing_ood.py.)"""
    predictor = Predictor(reg, device="cpu")
    photos = predictor.predict_auto(tests_of["photos"], tasks=["digits"])
    assert sum(r.rejected for r in photos) >= 0.9 * len(photos)
    assert all(r.task == "digits@1" for r in photos)


def test_the_rejection_rate_moves_the_threshold(reg, tests_of):
    predictor = Predictor(reg, device="cpu")
    images = tests_of["digits"]
    counts = [sum(r.rejected for r in predictor.predict_auto(images, tasks=["digits"], reject_rate=rate))
              for rate in (0.01, 0.05, 0.3)]
    assert counts[0] <= counts[1] <= counts[2] and counts[2] > counts[0]
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"rejection rate .* in \(0, 1\)"):
            predictor.predict_auto(images[:1], reject_rate=bad)


def test_versions_without_percentiles_are_never_rejected_until_refitted(reg, tmp_path):
    from tests.test_routing import _copy

    reg = _copy(reg, tmp_path)
    old = reg.get_version("digits")
    state, meta = load_adapter(reg.path_of(old))
    older = {k: v for k, v in state.items()  # as trained before: no percentiles, no token statistics
             if not k.startswith((f"{ROUTING_PREFIX}ood_", f"{ROUTING_PREFIX}tokens."))}
    reg.replace_file(old, older, meta)
    stats = _stats(reg, "digits")
    assert stats is not None and not stats.calibrated and stats.threshold() is None
    results = Predictor(reg, device="cpu").predict_auto(_foreign(), tasks=["digits"])
    assert not any(r.rejected for r in results) and all(r.fit is None for r in results)

    assert fit_routing(["digits", "photos"], registry=reg, device="cpu") == ["digits@1"]  # photos has them
    refitted = _stats(reg, "digits")
    assert torch.equal(refitted.counts, stats.counts)
    torch.testing.assert_close(refitted.ood_quantiles, split_state(state)[1].ood_quantiles, rtol=1e-4, atol=1e-3)
    assert all(r.rejected for r in Predictor(reg, device="cpu").predict_auto(_foreign(), tasks=["digits"]))


def test_calibration_scores_each_image_by_the_other_folds_only():
    torch.manual_seed(0)
    x, y = torch.randn(60, 6).double(), torch.arange(60) % 3
    x[y == 1] += 4
    cal = Calibration(60, 3, folds=5, keep=40, seed=1)
    stats = accumulate_stats([(x[:25], y[:25]), (x[25:], y[25:])], 3, cal)
    assert torch.equal(stats.scatter, accumulate_stats([(x[:25], y[:25]), (x[25:], y[25:])], 3).scatter)
    expected = []
    for k in range(5):  # by hand: the statistics of the other folds, then each kept image of fold k
        rest = cal.fold_of != k
        other = accumulate_stats([(x[rest], y[rest])], 3)
        w = Whitener.of(other.means.double(), other.counts, other.scatter.double(), OOD_SHRINKAGE).double()
        rows = (cal.fold_of == k) & cal.kept
        expected.append(w.scores(x[rows]))
    want = torch.quantile(torch.cat(expected), torch.linspace(0, 1, 101).double()).float()
    torch.testing.assert_close(stats.ood_quantiles, want, rtol=1e-4, atol=1e-4)
    assert accumulate_stats([(x[:10], y[:10])], 3, Calibration(10, 3)).ood_quantiles is None  # too few images


def test_a_router_over_old_and_new_versions():
    torch.manual_seed(0)
    x, y = torch.randn(100, 4), torch.arange(100) % 2
    new = accumulate_stats([(x, y)], 2, Calibration(100, 2))
    old = RoutingStats(new.means + 10, new.counts, new.scatter)
    fit = Router([old, new]).fit(torch.randn(3, 4))
    assert fit.shape == (3, 2) and bool(fit[:, 0].isnan().all()) and bool(((fit[:, 1] >= 0) & (fit[:, 1] <= 1)).all())


# -- the command line ------------------------------------------------------------------------------------------


def _cli(*args):
    from typer.testing import CliRunner

    from adaptkit.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("img")
    Image.fromarray((load_digits().images[7] * 255 / 16).astype("uint8"), mode="L").save(folder / "seven.png")
    _foreign()[0].save(folder / "noise.png")
    return folder / "seven.png", folder / "noise.png"


def test_cli_says_no_task_fits(reg, files):
    code, output = _cli("predict", *files, "--registry", reg.url)
    assert code == 0, output
    assert "seven.png: digits@1 (" in output and "% sure): " in output
    assert "noise.png: no task fits (nearest: " in output and " of its own images)" in output
    code, output = _cli("predict", *files, "--accept-all", "--registry", reg.url)
    assert code == 0 and "no task fits" not in output and "noise.png: " in output
    code, output = _cli("predict", *files, "--json", "--topk", "2", "--registry", reg.url)
    rows = json.loads(output)
    assert [r["rejected"] for r in rows] == [False, True]
    assert rows[1]["task"] in ("digits@1", "photos@1") and rows[1]["fit"] < 0.05 and len(rows[1]["predictions"]) == 2
    assert 0.05 <= rows[0]["fit"] <= 1
    code, output = _cli("predict", *files, "--reject-rate", "2", "--registry", reg.url)
    assert code == 1 and "rejection rate" in output and "Traceback" not in output


def test_routing_weighs_each_task_by_the_images_fit_to_it():
    torch.manual_seed(0)
    x, y = torch.randn(200, 4), torch.arange(200) % 2
    broad = accumulate_stats([(3 * x, y)], 2, Calibration(200, 2))  # the same class means, three times the spread
    narrow = accumulate_stats([(x + torch.tensor([0.5, 0, 0, 0]), y)], 2, Calibration(200, 2))
    feats = torch.cat([torch.randn(5, 4) * 3, torch.randn(5, 4)])
    plain = Router([broad, narrow], by_fit=False).route(feats)
    weighed = Router([broad, narrow]).route(feats)
    fit = weighed.fit.clamp(min=1e-3)
    want = plain.task_probs * fit / (plain.task_probs * fit).sum(1, keepdim=True)
    torch.testing.assert_close(weighed.task_probs, want, rtol=1e-4, atol=1e-5)
    assert (weighed.task_probs[:5].argmax(1) == 0).all()  # far-flung images go to the broad task
    # a version without percentiles counts as an image of median fit; one task alone is always certain
    old = RoutingStats(narrow.means, narrow.counts, narrow.scatter)
    mixed = Router([broad, old]).route(feats)
    half = torch.stack([fit[:, 0], torch.full((10,), 0.5)], 1)
    want = plain.task_probs * half / (plain.task_probs * half).sum(1, keepdim=True)
    torch.testing.assert_close(mixed.task_probs, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(Router([broad]).route(feats).task_probs, torch.ones(10, 1))


def test_choose_takes_the_most_probable_task_that_fits_and_rejects_only_when_none_does():
    from adaptkit.inference.router import Routes

    nan = float("nan")
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.3, 0.2]])
    fit = torch.tensor([[0.5, 0.5, 0.5], [0.01, 0.02, 0.5], [0.01, 0.02, 0.03], [0.2, 0.9, 0.04], [0.01, nan, 0.9]])
    routes = Routes(task_probs=probs, class_probs=probs, typicality=torch.zeros(5), fit=fit)
    chosen, runner, rejected = routes.choose(0.05)
    assert chosen.tolist() == [0, 2, 0, 1, 1]  # a task without percentiles (NaN) fits every image
    assert runner.tolist() == [1, 0, 1, 2, 0]
    assert rejected.tolist() == [False, False, True, False, False]
    chosen, _, rejected = routes.choose(None)  # accept_all: the most probable task, never rejected
    assert chosen.tolist() == [0, 0, 0, 2, 0] and not rejected.any()
    alone = Routes(task_probs=torch.ones(2, 1), class_probs=torch.ones(2, 1), typicality=torch.zeros(2),
                   fit=torch.tensor([[0.01], [0.5]]))
    assert [v.tolist() for v in alone.choose(0.05)] == [[0, 0], [0, 0], [True, False]]


def test_across_backbones_an_image_goes_where_a_task_fits_it(reg, tests_of):
    """Routed over backbones (here the two tasks as if on two: one group each), the most typical backbone wins
    among those with a task that fits the image; rejected, with the most typical, only when none has."""
    predictor = Predictor(reg, device="cpu")
    digits, photos = predictor.load("digits"), predictor.load("photos")
    x = torch.stack(tests_of["digits"][:50] + tests_of["photos"][:50]
                    + [predictor.preprocess(_foreign(), digits)[i] for i in range(6)])
    hosts = {1: [digits], 2: [photos]}
    passes = {k: predictor.frozen_pass(x, members, predictor._router(members, "qda").blocks)
              for k, members in hosts.items()}
    feats, taps = {k: p[0] for k, p in passes.items()}, {k: p[2] for k, p in passes.items()}
    alone = {k: predictor._router(m, "qda").route(feats[k], taps[k]) for k, m in hosts.items()}
    routes = predictor.pick(hosts, feats, "qda", 0.3, taps)
    moved = 0
    for i, r in enumerate(routes):
        fits = {k: alone[k].fit[i, 0].item() for k in hosts}
        typical = {k: alone[k].typicality[i].item() for k in hosts}
        nearest = min(hosts, key=typical.get)
        fitting = [k for k in hosts if fits[k] >= 0.3]
        want = min(fitting, key=typical.get) if fitting else nearest
        assert (r.task, r.rejected) == (hosts[want][0], not fitting), (i, fits, typical)
        moved += want != nearest
    assert moved >= 3 and any(r.rejected for r in routes), moved  # both cases are exercised

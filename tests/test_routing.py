"""Prediction with no task name: routing statistics in the adapter file, routed prediction, continual evaluation.

Two tasks of clearly different data sets (grey 8x8 digits, colour CIFAR-10 photos) on the packaged backbone (random
weights are too weak a feature space to route by), trained for one short epoch: routing must tell them apart from
frozen features alone.
"""

import json
import re
import shutil
import sqlite3

import pytest
import torch
from safetensors import safe_open
from torchvision.transforms.functional import to_pil_image

from adaptkit.artifacts import load_adapter
from adaptkit.cli.common import cli_words
from adaptkit.data import load_task_data
from adaptkit.errors import ConfigError, DatasetError, RoutingError
from adaptkit.inference import (
    ROUTING_PREFIX,
    Predictor,
    Router,
    RoutingStats,
    evaluate_continual,
    fit_routing,
    split_state,
)
from adaptkit.models import PACKAGED_BACKBONE
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, train

CONFIG = TrainConfig(epochs=1, batch_size=32, limit_train=160, limit_eval=40, lr=3e-3, num_workers=0)


def _train(reg: Registry, spec: str, task: str, **kw):
    return train(spec, task=task, backbone=PACKAGED_BACKBONE, method="adapter", method_config={"rank": 4},
                 config=CONFIG, registry=reg, download=False, **kw)


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory, cifar_mini) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("route") / "reg.db")
    _train(reg, "digits", "digits")
    _train(reg, f"folder:{cifar_mini}", "photos")
    return reg


@pytest.fixture(scope="module")
def test_images(two_tasks, cifar_mini):
    """20 test images of each task, as tensors in the backbone's eval transform, with their task."""
    dc = Predictor(two_tasks, device="cpu").load("digits").host.backbone.data_config
    out = []
    for spec, task in (("digits", "digits"), (f"folder:{cifar_mini}", "photos")):
        test = load_task_data(spec, dc, limit_eval=20, augment=False).test
        out += [(test[i][0], task) for i in range(len(test))]
    return out


def _copy(reg: Registry, dest) -> Registry:
    shutil.copytree(reg.adapter_dir, dest / "adapters")
    with sqlite3.connect(reg.engine.url.database) as src, sqlite3.connect(dest / "reg.db") as dst:
        src.backup(dst)  # the WAL's pages too
    return Registry(dest / "reg.db")


def test_train_writes_routing_statistics_into_the_adapter_file(two_tasks):
    row = two_tasks.get_version("digits")
    state, meta = load_adapter(two_tasks.path_of(row), sha256=row.sha256)
    own, stats = split_state(state)
    assert stats is not None and stats.means.shape == (10, 192) and stats.scatter.shape == (192, 192)
    assert int(stats.counts.sum()) == row.train["train_images"] + 40  # train + validation images (limit_eval)
    assert torch.equal(stats.scatter, stats.scatter.T)
    assert row.trainable_params == sum(t.numel() for t in own.values())  # statistics are not parameters
    assert RoutingStats.from_tensors(stats.to_tensors()).scatter.equal(stats.scatter)


def test_routing_picks_the_task_of_each_data_set(two_tasks, test_images):
    predictor = Predictor(two_tasks, device="cpu")
    results = predictor.predict_auto([x for x, _ in test_images], topk=2)
    chosen = [r.task.partition("@")[0] for r in results]
    assert sum(c == t for c, (_, t) in zip(chosen, test_images, strict=True)) >= 38  # of 40
    assert all(r.runner_up is not None and r.confidence >= r.runner_up_confidence for r in results)
    assert all(abs(r.confidence + r.runner_up_confidence - 1) < 1e-4 for r in results)  # two tasks share it all


def _assert_each_as_alone(predictor, images, results):
    """Each routed answer equals the image run alone through the task it was routed to."""
    for img, r in zip(images, results, strict=True):
        alone = predictor.predict([img], r.task, topk=3)[0]
        assert [p.label for p in r.predictions] == [p.label for p in alone]
        assert [p.prob for p in r.predictions] == pytest.approx([p.prob for p in alone], abs=1e-5)


def test_routed_mixed_pass_equals_each_image_alone(two_tasks, test_images):
    predictor = Predictor(two_tasks, device="cpu")
    images = [x for x, _ in test_images[15:25]]  # both tasks in one batch
    results = predictor.predict_auto(images, topk=3)
    assert len({r.task for r in results}) == 2
    _assert_each_as_alone(predictor, images, results)


@pytest.mark.parametrize("method, config, start", [
    ("adapter", {"rank": 4, "blocks": 2}, 4),  # 6 blocks: the shared pass stops at block 4
    ("linear", None, 6),  # the head reads the routing pass's pooled features: no second pass at all
    ("ssf", None, None),  # SSF scales the patch embedding: its pass starts at the image
])
def test_routed_pass_starts_where_the_frozen_pass_can_hand_over(two_tasks, test_images, tmp_path, method, config,
                                                                start):
    reg = _copy(two_tasks, tmp_path)
    train("digits", task="late", backbone=PACKAGED_BACKBONE, method=method, method_config=config, config=CONFIG,
          registry=reg, download=False)
    predictor = Predictor(reg, device="cpu")
    tasks = [predictor.load(t) for t in ("late", "photos")]
    images = [x for x, _ in test_images[10:30]]
    x = torch.stack(images)
    feats, prefix = predictor.frozen_prefix(x, tasks)
    assert torch.equal(feats, predictor.frozen_features(x, tasks[0]))  # the split pass is the same pass
    tapped, _, taps = predictor.frozen_pass(x, tasks, (2, 6))  # the rejection score's tokens, on the way
    assert torch.equal(tapped, feats) and torch.equal(taps[6], feats) and taps[2].shape == feats.shape
    assert (None if prefix is None else prefix.start) == (None if start is None else 0)  # photos: every block
    _, prefix = predictor.frozen_prefix(x, tasks[:1])
    assert (None if prefix is None else prefix.start) == start
    results = predictor.predict_auto(images, topk=3, tasks=["late"])
    _assert_each_as_alone(predictor, images, results)
    mixed = predictor.predict_auto(images, topk=3, tasks=["late", "photos"])
    assert len({r.task for r in mixed}) == 2
    _assert_each_as_alone(predictor, images, mixed)


def test_a_single_task_routes_to_itself(two_tasks, test_images):
    results = Predictor(two_tasks, device="cpu").predict_auto([x for x, _ in test_images], tasks=["photos"])
    assert {r.task for r in results} == {"photos@1"}
    assert all(r.confidence == 1.0 and r.runner_up is None for r in results)


def test_a_later_task_leaves_earlier_statistics_and_predictions_identical(two_tasks, test_images, tmp_path, cifar_mini):
    reg = _copy(two_tasks, tmp_path)
    x = torch.stack([x for x, _ in test_images[:6]])
    before_file = reg.path_of(reg.get_version("digits")).read_bytes()
    before = Predictor(reg, device="cpu").logits(x, "digits")
    _train(reg, f"folder:{cifar_mini}", "pets", classes="cat,dog")
    assert reg.path_of(reg.get_version("digits")).read_bytes() == before_file
    assert torch.equal(Predictor(reg, device="cpu").logits(x, "digits"), before)
    assert reg.get_version("pets").train["classes"] == "cat,dog"
    assert reg.tasks()[[t.name for t in reg.tasks()].index("pets")].classes == ["cat", "dog"]


def test_a_removed_task_leaves_routing(two_tasks, test_images, tmp_path):
    reg = _copy(two_tasks, tmp_path)
    reg.remove("photos")
    results = Predictor(reg, device="cpu").predict_auto([x for x, _ in test_images])
    assert {r.task for r in results} == {"digits@1"}


def test_versions_without_statistics_name_the_command_that_fills_them_in(two_tasks, test_images, tmp_path):
    reg = _copy(two_tasks, tmp_path)
    old = reg.get_version("photos")
    state, meta = load_adapter(reg.path_of(old))
    reg.replace_file(old, split_state(state)[0], meta)  # as a file from before routing existed
    assert reg.get_version("photos").sha256 != old.sha256 and not reg.path_of(old).exists()
    with safe_open(str(reg.path_of(reg.get_version("photos"))), "pt") as fh:
        assert not [k for k in fh.keys() if k.startswith(ROUTING_PREFIX)]
    images = [x for x, _ in test_images]
    routed = Predictor(reg, device="cpu").predict_auto(images)  # the other task still routes; photos is named
    assert {r.task for r in routed} == {"digits@1"} and {r.left_out for r in routed} == {("photos@1",)}
    assert [(r.task.ref, r.left_out) for r in Predictor(reg, device="cpu").route(images[:2])] == \
        [("digits@1", ("photos@1",))] * 2
    with pytest.raises(RoutingError, match=r"photos@1 has no routing statistics .*fit_routing\(\['photos'\]\)") as info:
        Predictor(reg, device="cpu").predict_auto(images, tasks=["photos"])  # none of the candidates has them
    assert "run `adaptkit routing fit photos` to compute them, or name the task (--task NAME)" in \
        info.value.worded(cli_words)
    from typer.testing import CliRunner

    from adaptkit.cli import app

    image = tmp_path / "one.png"
    to_pil_image((images[0] * 0.25 + 0.5).clamp(0, 1)).save(image)
    args = ["predict", str(image), "--registry", str(reg.engine.url.database), "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "note: routed over the other tasks; left out photos@1: no routing statistics" in text
    assert "run `adaptkit routing fit photos` to route to it too" in text

    assert fit_routing(registry=reg, device="cpu") == ["photos@1"]
    assert fit_routing(registry=reg, device="cpu") == []  # nothing left to fill in
    filled = reg.get_version("photos")
    stats = split_state(load_adapter(reg.path_of(filled), sha256=filled.sha256)[0])[1]
    original = split_state(state)[1]
    assert torch.equal(stats.counts, original.counts)
    torch.testing.assert_close(stats.means, original.means, atol=1e-5, rtol=1e-5)
    chosen = [r.task for r in Predictor(reg, device="cpu").predict_auto(images)]
    assert sum(c == f"{t}@1" for c, (_, t) in zip(chosen, test_images, strict=True)) >= 38


def test_fit_routing_names_a_missing_data_set(two_tasks, tmp_path):
    reg = _copy(two_tasks, tmp_path)
    with pytest.raises(DatasetError, match=r"pass the data set it was trained on as dataset\)") as info:
        fit_routing(["digits"], registry=reg, force=True, dataset="folder:/nowhere", device="cpu")
    assert info.value.worded(cli_words).endswith("as --dataset SPEC)")


def test_continual_evaluation_in_the_order_tasks_were_added(two_tasks):
    report = evaluate_continual(registry=two_tasks, device="cpu", limit=20, refine=True)
    assert report.tasks == ["digits@1", "photos@1"] and report.images == [20, 20]
    assert report.task_id[0] == 1.0 and report.task_id[1] >= 0.95  # one task, trivially; then data sets differ
    assert report.til[1] - 0.05 <= report.cil[1] <= report.til[1]  # routing costs at most its own errors
    assert report.cil[0] == report.til[0]
    assert report.matrix[0][1] is None and report.matrix[1][0] == report.matrix[0][0]
    assert report.forgetting == pytest.approx(report.matrix[0][0] - report.matrix[1][0])
    assert report.average_incremental == pytest.approx(sum(report.cil) / 2)
    assert len(report.refined) == 2 and 0 <= report.simplecil[1] <= 1


def test_router_kinds_and_bad_input():
    torch.manual_seed(0)
    feats = torch.randn(200, 8)
    stats = [RoutingStats(means=torch.stack([feats[:100].mean(0) + 5, feats[100:].mean(0) - 5]),
                          counts=torch.tensor([100, 100]), scatter=torch.eye(8) * 200)]
    for kind in ("lda", "qda", "ridge", "ncm"):
        routes = Router(stats, kind=kind).route(torch.stack([feats[0] + 5, feats[1] - 5]))
        assert routes.task_probs.shape == (2, 1) and routes.class_probs.argmax(1).tolist() == [0, 1]
    with pytest.raises(Exception, match="unknown router 'knn'"):
        Router(stats, kind="knn")


def _gaussian_task(n: int, spread: torch.Tensor, shift: float, gen: torch.Generator) -> tuple:
    """n images of two classes around +-shift on the first axis, per-axis standard deviations ``spread``."""
    x = torch.randn(n, len(spread), generator=gen) * spread
    y = torch.arange(n) % 2
    x[:, 0] += shift * (2 * y - 1)
    return x, y


def _stats(x: torch.Tensor, y: torch.Tensor) -> RoutingStats:
    means = torch.stack([x[y == c].mean(0) for c in (0, 1)])
    diff = x - means[y]
    return RoutingStats(means=means, counts=torch.bincount(y, minlength=2), scatter=diff.T @ diff)


def test_qda_routes_by_a_spread_that_only_one_task_has():
    """Two tasks with the same class means: one spread in every direction ("colour"), the other with almost none
    along the last 4 axes ("grey"). Only their spreads tell them apart, so the pooled covariance (lda) cannot,
    and qda, the default, must; and its prior weight must follow the number of images."""
    gen = torch.Generator().manual_seed(0)
    d = 12
    colour = torch.ones(d)
    grey = torch.cat([torch.ones(d - 4), torch.full((4,), 0.05)])
    train = [_gaussian_task(600, colour, 3.0, gen), _gaussian_task(600, grey, 3.0, gen)]
    test = [_gaussian_task(400, colour, 3.0, gen)[0], _gaussian_task(400, grey, 3.0, gen)[0]]
    stats = [_stats(*t) for t in train]

    def identified(router: Router) -> float:
        return sum((router.route(x).task_probs.argmax(1) == j).double().mean().item()
                   for j, x in enumerate(test)) / 2

    assert Router(stats).kind == "qda"
    assert identified(Router(stats, by_fit=False)) > 0.95
    assert identified(Router(stats, kind="lda", by_fit=False)) < 0.65
    weights = [t.prior_weight for t in Router(stats).task_spreads]
    assert max(weights) < 0.2  # 600 images each: their own spreads, not the pooled one
    # one image per class: nothing to estimate a spread from, so the task takes the pooled covariance
    one = RoutingStats(means=stats[0].means, counts=torch.tensor([1, 1]), scatter=torch.zeros(d, d))
    assert Router([stats[0], one]).task_spreads[1].prior_weight == 1.0
    # tasks of one data set (its classes split into tasks) share one spread, as lda does: then the spreads cannot
    # tell them apart, and the shared estimate is the same for both
    shared = Router(stats, groups=["cifar", "cifar"], by_fit=False)
    assert identified(shared) < 0.65
    assert torch.equal(shared.task_spreads[0].proj, shared.task_spreads[1].proj)
    with pytest.raises(ConfigError, match="groups names 1 tasks, the router has 2"):
        Router(stats, groups=["cifar"])


def test_the_cli_offers_the_routers_the_library_has():
    from adaptkit.cli.common import ROUTER_NAMES
    from adaptkit.inference import DEFAULT_ROUTER, ROUTERS

    assert ROUTER_NAMES == ROUTERS and ROUTER_NAMES[0] == DEFAULT_ROUTER


# -- the command line ------------------------------------------------------------------------------------------


def _cli(*args) -> str:
    from typer.testing import CliRunner

    from adaptkit.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def two_files(tmp_path_factory, cifar_mini):
    """A digit (as a PNG) and a CIFAR-10 photo."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digit = tmp_path_factory.mktemp("img") / "seven.png"
    Image.fromarray((load_digits().images[7] * 255 / 16).astype("uint8"), mode="L").save(digit)
    return digit, cifar_mini / "test" / "ship" / "0003.jpg"


def test_cli_predict_routes_without_a_task(two_tasks, two_files):
    code, output = _cli("predict", *two_files, "--json", "--topk", "2", "--registry", two_tasks.url)
    assert code == 0, output
    rows = json.loads(output)
    assert [r["task"] for r in rows] == ["digits@1", "photos@1"]
    assert all(0.5 <= r["confidence"] <= 1 and r["runner_up"] and len(r["predictions"]) == 2 for r in rows)
    # routing, not rejection, is what this checks: this one digit lies beyond 95.9 % of its task's own images on
    # the blocks' tokens (test_routing_ood.py and test_rejection_tokens.py check rejection)
    code, output = _cli("predict", *two_files, "--accept-all", "--registry", two_tasks.url)
    assert code == 0 and "seven.png: digits@1 (" in output and "% sure): " in output
    for router in ("lda", "ncm"):
        code, output = _cli("predict", *two_files, "--json", "--router", router, "--registry", two_tasks.url)
        assert code == 0 and [r["task"] for r in json.loads(output)] == ["digits@1", "photos@1"], output


@pytest.mark.parametrize("args", [["photos"], ["--task", "photos"], ["-t", "photos@1"]])
def test_cli_predict_with_a_task_pins_it(two_tasks, two_files, args):
    code, output = _cli("predict", *args, *two_files, "--json", "--registry", two_tasks.url)
    assert code == 0, output
    rows = json.loads(output)
    assert [r["task"] for r in rows] == ["photos@1", "photos@1"] and "confidence" not in rows[0]


@pytest.mark.parametrize(("args", "message"), [
    (["nothing", "x.jpg"], "no task 'nothing'"),
    (["photos"], "no images given"),
    (["missing.png"], "image missing.png does not exist"),
])
def test_cli_predict_bad_input(two_tasks, args, message):
    code, output = _cli("predict", *args, "--registry", two_tasks.url)
    assert code == 1 and message in output and "Traceback" not in output


def test_cli_refuses_an_unknown_router_before_loading_anything(two_tasks):
    for command in (["predict", "x.jpg"], ["continual"]):
        code, output = _cli(*command, "--router", "knn", "--registry", two_tasks.url)
        assert code == 2 and "'knn' is no router: use one of qda, lda, ridge, ncm" in output, output


def test_cli_routing_fit_and_continual(two_tasks, tmp_path):
    reg = _copy(two_tasks, tmp_path)
    code, output = _cli("routing", "fit", "--registry", reg.url)
    assert code == 0 and "wrote routing statistics for 0 version(s)" in output
    code, output = _cli("continual", "--limit", "10", "--json", "--registry", reg.url)
    assert code == 0, output
    report = json.loads(output)
    assert report["tasks"] == ["digits@1", "photos@1"] and len(report["matrix"]) == 2
    code, output = _cli("continual", "--limit", "10", "--registry", reg.url)
    assert code == 0 and "average incremental accuracy" in output and "1. digits@1" in output
    lines = output.splitlines()  # piped: plain tables, each under its title, as list and compare print them
    assert not re.search("[│┃━─┏└]", output), output
    assert lines[0] == "Accuracy (%) after each task is added, no task name given"
    assert lines[1].split() == ["after", "task-id", "no", "task", "task", "given", "SimpleCIL"]
    assert lines[2].split()[:2] == ["1.", "digits@1"] and lines[3].split()[:2] == ["2.", "photos@1"]
    assert lines[4] == "No-task accuracy (%) on each task's test images (rows: after task k)"
    assert lines[5].split() == ["after", "1", "2"] and len(lines[6].split()) == 2 and len(lines[7].split()) == 3


def test_class_selection():
    from adaptkit.data.subsets import parse_classes

    names = ["cat", "dog", "ship", "truck"]
    assert parse_classes("1-2", names) == [1, 2]
    assert parse_classes("0,3", names) == [0, 3]
    assert parse_classes("truck,cat", names) == [3, 0]
    assert parse_classes(["dog"], names) == [1]
    for bad, message in [("2-7", "out of bounds"), ("cow", "no class(es) ['cow']"), ("cat,cat", "more than once"),
                         (" , ", "empty class selection"), ("3-1", "out of bounds")]:
        with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            parse_classes(bad, names)

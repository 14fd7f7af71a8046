""""No task fits" read on the blocks' tokens (issue 37): broad colour-photo tasks reject images of another kind,
keep their own at the stated rate, and older files without the token statistics are read and routed as before.

The packaged backbone (pretrained, offline) and real photos from ../shared/data/cifar10-mini; the images of another
kind are made here: uniform noise and line drawings of the test photos.
"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from adaptkit.artifacts import load_adapter
from adaptkit.data import TransformedSubset, load_task_data
from adaptkit.errors import ConfigError
from adaptkit.inference import ROUTING_PREFIX, Predictor, Router, Whitener, collect_task_stats, fit_routing, split_state
from adaptkit.inference.routing_stats import Calibration, RoutingStats, accumulate_stats, frozen
from adaptkit.inference.token_stats import token_blocks
from adaptkit.models import PACKAGED_BACKBONE
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, train
from adaptkit.trunk import SPECTRUM, run_prefix, run_suffix

CONFIG = TrainConfig(epochs=1, batch_size=64, lr=3e-3, num_workers=0, augment=False)
FIRST, SECOND = "airplane,automobile,bird,cat,deer", "dog,frog,horse,ship,truck"


@pytest.fixture(scope="module")
def reg(tmp_path_factory, cifar_mini) -> Registry:
    """Two broad colour-photo tasks: a linear probe (statistics from its feature cache) and an adapter in the last
    block (statistics from a frozen pass after training)."""
    reg = Registry(tmp_path_factory.mktemp("tokens") / "reg.db")
    for task, method, classes, cfg in (("photos-a", "linear", FIRST, None), ("photos-b", "adapter", SECOND,
                                                                              {"blocks": 1})):
        train(f"folder:{cifar_mini}", task=task, backbone=PACKAGED_BACKBONE, method=method, method_config=cfg,
              config=CONFIG, registry=reg, classes=classes)
    return reg


def _test_photos(cifar_mini, classes: str) -> list[Image.Image]:
    data = load_task_data(f"folder:{cifar_mini}", {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3},
                          augment=False, classes=classes)
    test = data.test
    return [test.source[i][0].convert("RGB") for i in test.indices]


def _noise(n: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def _drawing(img: Image.Image) -> Image.Image:
    """A photo as a line drawing: dark edges on white."""
    edges = img.convert("L").filter(ImageFilter.GaussianBlur(0.7)).filter(ImageFilter.FIND_EDGES)
    return Image.eval(edges, lambda v: 255 - min(255, 2 * v)).convert("RGB")


def _stats(reg: Registry, ref: str) -> RoutingStats:
    row = reg.get_version(ref)
    return split_state(load_adapter(reg.path_of(row), sha256=row.sha256)[0])[1]


def _rejected(results) -> float:
    return sum(r.rejected for r in results) / len(results)


def test_images_of_another_kind_are_rejected_beside_broad_photo_tasks(reg, cifar_mini):
    predictor = Predictor(reg, device="cpu")
    drawings = [_drawing(p) for p in _test_photos(cifar_mini, FIRST)[:40]]
    for kind, images in (("noise", _noise()), ("line drawings", drawings)):
        results = predictor.predict_auto(images, topk=1)
        assert _rejected(results) >= 0.9, (kind, [round(r.fit, 2) for r in results])
        assert all(r.fit is not None and r.rejected == (r.fit < 0.05) for r in results)


def test_own_held_out_images_are_rejected_at_about_the_stated_rate(reg, cifar_mini):
    predictor = Predictor(reg, device="cpu")
    for ref, classes in (("photos-a", FIRST), ("photos-b", SECOND)):
        own = _test_photos(cifar_mini, classes)  # 100 test images, never seen in training
        default = predictor.predict_auto(own, topk=1, tasks=[ref])
        assert _rejected(default) <= 0.12, ref  # 5 % stated; 100 images
        wider = predictor.predict_auto(own, topk=1, tasks=[ref], reject_rate=0.3)
        assert 0.15 <= _rejected(wider) <= 0.45, ref


def test_an_image_is_rejected_only_when_every_task_rejects_it(reg, cifar_mini):
    """Its nearest task rejecting it, an image goes to the most probable task that fits it; "no task fits" (with
    the nearest task and its fit) only when none does. At a 50 % rate many images fit one task and not the other."""
    predictor = Predictor(reg, device="cpu")
    images = _test_photos(cifar_mini, FIRST) + _test_photos(cifar_mini, SECOND) + _noise(10)
    refs, rate = ["photos-a", "photos-b"], 0.5
    alone = {ref: [r.fit for r in predictor.route(images, tasks=[ref])] for ref in refs}  # each task's own fit
    nearest = [r.task.ref.partition("@")[0] for r in predictor.route(images, tasks=refs, accept_all=True)]
    routes = predictor.route(images, tasks=refs, reject_rate=rate)
    elsewhere = 0
    for i, r in enumerate(routes):
        ref = r.task.ref.partition("@")[0]
        fits = {t: alone[t][i] for t in refs}
        assert r.rejected == all(f < rate for f in fits.values()), (i, fits)
        assert r.fit == pytest.approx(fits[ref], abs=1e-6)
        if r.rejected or fits[nearest[i]] >= rate:
            assert ref == nearest[i]  # rejected: the nearest task is named; fitting its nearest task: as before
        else:
            assert r.fit >= rate and ref != nearest[i]
            assert r.runner_up.ref.partition("@")[0] == nearest[i]
            elsewhere += 1
    assert elsewhere >= 5 and sum(r.rejected for r in routes) >= 20  # both cases are exercised
    answers = predictor.predict_auto(images, topk=1, tasks=refs, reject_rate=rate)
    assert [(a.task, a.rejected) for a in answers] == [(r.task.ref, r.rejected) for r in routes]
    for a, r in zip(answers, routes, strict=True):  # the likelier task passed over is named, and only then
        moved = not r.rejected and r.runner_up is not None and r.runner_up_confidence > r.confidence
        assert a.passed_over == (r.runner_up.ref if moved else None)


def test_both_ways_of_making_statistics_agree_and_are_stored(reg, cifar_mini):
    """The linear probe's come from its feature cache, the adapter's from a frozen pass: a pass over the probe's
    images gives the same token statistics."""
    blocks = token_blocks(6)
    for ref in ("photos-a", "photos-b"):
        tokens = _stats(reg, ref).tokens
        assert tokens is not None and tokens.blocks == blocks and tokens.quantiles.shape == (101,)
    stored = _stats(reg, "photos-a").tokens
    predictor = Predictor(reg, device="cpu")
    host = predictor.load("photos-a").host
    data = load_task_data(f"folder:{cifar_mini}", host.backbone.data_config, augment=False, classes=FIRST,
                          val_fraction=0.1, seed=0)
    again = collect_task_stats(host.backbone.model, data).tokens
    for a, b in zip(stored.gaussians, again.gaussians, strict=True):
        torch.testing.assert_close(a.means, b.means, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.var, b.var, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(a.quantiles, b.quantiles, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(stored.quantiles, again.quantiles, rtol=1e-3, atol=1e-3)


def test_an_older_file_without_token_statistics_is_routed_as_before(reg, tmp_path, cifar_mini):
    from tests.test_routing import _copy

    reg = _copy(reg, tmp_path)
    row = reg.get_version("photos-a")
    state, meta = load_adapter(reg.path_of(row))
    older = {k: v for k, v in state.items() if not k.startswith(f"{ROUTING_PREFIX}tokens.")}
    reg.replace_file(row, older, meta)
    stats = _stats(reg, "photos-a")
    assert stats.tokens is None and stats.calibrated
    images = _noise(8) + _test_photos(cifar_mini, FIRST)[:8]
    predictor = Predictor(reg, device="cpu")
    routes = predictor.route(images, tasks=["photos-a"])
    # as before: the fit of the pooled output's Mahalanobis score
    task = predictor.load("photos-a")
    with torch.inference_mode(), frozen(task.host.backbone.model) as trunk:
        feats = trunk(predictor.preprocess(images, task)).float()
    whitener = Whitener.of(stats.means, stats.counts, stats.scatter, stats.ood_shrinkage)
    expected = stats.fit(whitener.scores(feats)).float()
    torch.testing.assert_close(torch.tensor([r.fit for r in routes]), expected, rtol=1e-4, atol=1e-5)
    assert fit_routing(["photos-a", "photos-b"], registry=reg, device="cpu") == ["photos-a@1"]  # b is complete
    assert _stats(reg, "photos-a").tokens is not None


def test_bad_token_statistics_are_refused_where_they_are_read(reg):
    row = reg.get_version("photos-a")
    state = load_adapter(reg.path_of(row))[0]
    routing = {k: v for k, v in state.items() if k.startswith(ROUTING_PREFIX)}
    key = f"{ROUTING_PREFIX}tokens.quantiles"
    spectrum = {k: v for k, v in routing.items() if k.startswith(f"{ROUTING_PREFIX}tokens.{SPECTRUM}.")}
    wide = {k: v.repeat_interleave(5, dim=-1) if k.endswith((".means", ".basis")) else v  # 240 > 192 values
            for k, v in spectrum.items()}
    for broken in ({**routing, key: routing[key].flip(0)},  # percentiles must not decrease
                   {k: v for k, v in routing.items() if not k.endswith(".basis")},  # a part missing
                   {**routing, **wide}):  # a spectrum longer than the features
        with pytest.raises(ConfigError, match="token statistics"):
            RoutingStats.from_tensors(broken)
    tokens = RoutingStats.from_tensors(routing).tokens  # a spectrum of another length than the backbone's
    taps = {b: torch.zeros(2, 40 if b == SPECTRUM else 192) for b in tokens.blocks}
    with pytest.raises(ConfigError, match="48 values at place -1, but this backbone gives 40: refit"):
        tokens.scores(taps)


def test_the_frozen_pass_hands_back_the_tokens_without_changing_its_output(reg):
    predictor = Predictor(reg, device="cpu")
    trunk = predictor.load("photos-a").host.backbone.model.eval()
    x = torch.randn(3, 3, 32, 32)
    depth = len(trunk.blocks)
    with torch.inference_mode(), frozen(trunk):
        plain = trunk(x)
        taps = dict.fromkeys(token_blocks(depth))
        split = run_suffix(trunk, run_prefix(trunk, x, 2, taps), 2, taps)
        h = run_prefix(trunk, x, 0)
        means = {}
        for i, block in enumerate(trunk.blocks):
            h = block(h)
            means[i] = h[:, trunk.num_prefix_tokens:].mean(1)
        patches = trunk.patch_embed(x).double().numpy()  # (3, 64, 192): the embeddings before positions
    assert torch.equal(split, plain) and torch.equal(taps[depth], plain)
    for b in token_blocks(depth)[1:-1]:
        assert torch.equal(taps[b], means[b])
    # the spectrum: each image's 192 x 192 covariance, of rank 48 (4 x 4 pixels x 3 colours), its eigenvalues
    lam = np.stack([np.linalg.eigvalsh(np.cov(p.T))[::-1][:48] for p in patches]).clip(0)
    expected = np.log(lam + 1e-4 * lam.mean(1, keepdims=True))
    assert taps[SPECTRUM].shape == (3, 48)
    np.testing.assert_allclose(taps[SPECTRUM].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_a_router_reads_the_tokens_it_is_given_and_the_pooled_score_without_them(reg):
    stats = [_stats(reg, "photos-a"), _stats(reg, "photos-b")]
    router = Router(stats)
    assert router.blocks == token_blocks(6)
    feats = torch.randn(4, 192)
    taps = {b: torch.randn(4, 48 if b == SPECTRUM else 192) * 50 for b in router.blocks}  # far from any photo's
    assert bool((router.fit(feats, taps) < 0.05).all())
    pooled = router.fit(feats)  # no tokens: the pooled output's score, as for older files
    for t, s in enumerate(stats):
        w = Whitener.of(s.means, s.counts, s.scatter, s.ood_shrinkage)
        torch.testing.assert_close(pooled[:, t], s.fit(w.scores(feats)).float())


def _digits(n: int = 60) -> list[Image.Image]:
    """Handwritten digits (scikit-learn's bundled 8 x 8 scans), blown up to 32 x 32: grey images of another kind."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:n]
    return [Image.fromarray((255 - 255 * im / 16).astype(np.uint8)).resize((32, 32)).convert("RGB") for im in images]


@pytest.fixture(scope="module")
def first_fix(reg, tmp_path_factory, cifar_mini) -> Registry:
    """A copy of ``reg`` whose files hold the token statistics as the first fix of issue 37 made them: the five
    places without the patch spectrum, computed from the same training images by the same code."""
    from tests.test_routing import _copy

    reg = _copy(reg, tmp_path_factory.mktemp("first-fix"))
    predictor = Predictor(reg, device="cpu")
    for ref, classes in (("photos-a", FIRST), ("photos-b", SECOND)):
        backbone = predictor.load(ref).host.backbone
        data = load_task_data(f"folder:{cifar_mini}", backbone.data_config, augment=False, classes=classes,
                              val_fraction=0.1, seed=0)
        images = TransformedSubset(data.val.source, sorted([*data.train.indices, *data.val.indices]),
                                   data.val.transform)
        x = torch.stack([images[i][0] for i in range(len(images))])
        y = torch.tensor([images[i][1] for i in range(len(images))])
        places = token_blocks(6)[1:]
        with torch.inference_mode(), frozen(backbone.model) as trunk:
            taps = dict.fromkeys(places)
            feats = run_prefix(trunk, x, 6, taps)
        stats = accumulate_stats([(feats, y, taps)], len(data.classes), Calibration(len(y), len(data.classes)),
                                 blocks=places)
        row = reg.get_version(ref)
        state, meta = load_adapter(reg.path_of(row))
        reg.replace_file(row, {**split_state(state)[0], **stats.to_tensors()}, meta)
    return reg


def test_grey_images_beside_broad_colour_photo_tasks_are_rejected_with_the_spectrum(reg, first_fix, cifar_mini):
    """Digits and grey photos look typical to a colour-photo task's mean tokens (the first fix rejects 0-1 % of
    them); the spectrum of their patch embeddings lacks the colour directions (measured: 100 % and 64 %)."""
    grey = [p.convert("L").convert("RGB") for p in _test_photos(cifar_mini, SECOND)]  # 100 photos, never trained on
    before, now = Predictor(first_fix, device="cpu"), Predictor(reg, device="cpu")
    for kind, images, old_at_most, new_at_least in (("digits", _digits(), 0.2, 0.9), ("grey", grey, 0.15, 0.4)):
        old, new = _rejected(before.predict_auto(images, topk=1)), _rejected(now.predict_auto(images, topk=1))
        assert old <= old_at_most and new >= new_at_least, (kind, old, new)


def test_a_file_of_the_first_fix_is_scored_on_its_own_places_and_completed_by_routing_fit(first_fix, tmp_path,
                                                                                         cifar_mini):
    from tests.test_routing import _copy

    stats = _stats(first_fix, "photos-a")
    assert stats.tokens.blocks == token_blocks(6)[1:]
    images = _digits(8) + _test_photos(cifar_mini, FIRST)[:8]
    predictor = Predictor(first_fix, device="cpu")
    routes = predictor.route(images, tasks=["photos-a"])
    task = predictor.load("photos-a")
    with torch.inference_mode(), frozen(task.host.backbone.model) as trunk:
        taps = dict.fromkeys(stats.tokens.blocks)
        run_prefix(trunk, predictor.preprocess(images, task), 6, taps)
    expected = stats.tokens.fit(stats.tokens.scores(taps)).float()
    torch.testing.assert_close(torch.tensor([r.fit for r in routes]), expected, rtol=1e-4, atol=1e-5)
    copy = _copy(first_fix, tmp_path)
    assert fit_routing(["photos-a", "photos-b"], registry=copy, device="cpu") == ["photos-a@1", "photos-b@1"]
    assert _stats(copy, "photos-a").tokens.blocks == token_blocks(6)


@pytest.mark.parametrize("width", [16, 96])  # fewer channels than patches (its covariance), more (the Gram matrix)
def test_the_patch_spectrum_is_the_covariance_spectrum_and_a_grey_image_lacks_two_thirds_of_it(width):
    import timm

    from adaptkit.trunk import patch_spectrum

    trunk = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4,
                              embed_dim=width, depth=1, num_heads=2).eval()
    colour = torch.rand(2, 3, 32, 32)
    grey = colour.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    with torch.inference_mode():
        spectra = patch_spectrum(trunk, torch.cat([colour, grey]))
        patches = trunk.patch_embed(colour).double().numpy()
    k = min(63, width, 48)  # patches - 1, channels, values of a 4 x 4 colour patch
    assert spectra.shape == (4, k)
    lam = np.stack([np.linalg.eigvalsh(np.cov(p.T))[::-1][:k] for p in patches]).clip(0)
    np.testing.assert_allclose(spectra[:2].numpy(), np.log(lam + 1e-4 * lam.mean(1, keepdims=True)), rtol=1e-4,
                               atol=1e-4)
    if k > 16:  # a grey patch has 16 values, not 48: its other eigenvalues sit at the floor (1e-4 of the mean)
        relative = spectra - spectra.exp().mean(1, keepdim=True).log()
        assert bool((relative[2:, 16:] < -6).all()) and bool((relative[:2, 16] > -5).all())

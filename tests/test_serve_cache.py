"""The adapter cache of the serving layer: byte budget, least-recently-used eviction, prefetch overlapping a batch,
per-request errors, thread safety; in-process over random-weight pico tasks (no Ray)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from adaptkit.artifacts import AdapterMeta
from adaptkit.backbone import create_backbone
from adaptkit.errors import ArtifactError, ConfigError, NotFoundError
from adaptkit.inference import Predictor, RoutingStats
from adaptkit.methods import get_method, unwrap
from adaptkit.registry import Registry
from adaptkit.serving.cache import AdapterCache
from tests.conftest import PICO

NAMES = ["alpha", "beta", "gamma", "delta"]


def register_random(reg: Registry, backbone, name: str, seed: int, num_classes: int = 4, rank: int = 8,
                    routing: bool = True):
    """A random-weight adapter task with routing statistics (unless not ``routing``; no training): its row."""
    torch.manual_seed(seed)
    model = get_method("adapter", {"rank": rank}).attach(backbone.model, num_classes)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(std=0.05)
    d = backbone.embed_dim
    stats = RoutingStats(means=torch.randn(num_classes, d), counts=torch.full((num_classes,), 50),
                         scatter=torch.eye(d) * 50.0 * num_classes)
    meta = AdapterMeta(task=name, classes=[f"{name}{i}" for i in range(num_classes)], method="adapter",
                       method_config=model.method.config_dict(), backbone=backbone.name,
                       backbone_weights=backbone.weights, backbone_fingerprint=backbone.fingerprint,
                       backbone_params=backbone.num_params, backbone_dim=d, data_config=backbone.data_config,
                       dataset="random")
    row = reg.add_version(meta, {**model.state(), **(stats.to_tensors() if routing else {})})
    model.detach_from_trunk()
    unwrap(backbone.model)
    return row


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (40, 36)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def same(a, b) -> bool:
    return [p.label for p in a] == [p.label for p in b] and np.allclose([p.prob for p in a], [p.prob for p in b],
                                                                         atol=1e-5)


@pytest.fixture(scope="module")
def reg(tmp_path_factory) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("serve-cache") / "registry.db")
    backbone = create_backbone(PICO, pretrained=False)
    for i, name in enumerate(NAMES):
        register_random(reg, backbone, name, seed=i)
    return reg


@pytest.fixture(scope="module")
def expected(reg):
    """Each task's answers on the test images, from a plain Predictor with every task resident."""
    plain = Predictor(reg, device="cpu")
    imgs = random_images(4)
    return imgs, {n: plain.predict(imgs, n, topk=3) for n in NAMES}


def one_task_mb(reg: Registry) -> float:
    return reg.get_version("alpha").bytes / 2 ** 20


def test_lru_keeps_the_budget_and_evicts_the_least_recently_used(reg, expected):
    imgs, want = expected
    cache = AdapterCache(Predictor(reg, device="cpu"), cache_mb=2.5 * one_task_mb(reg), prefetch=False)
    for name in ["alpha", "beta", "alpha", "gamma"]:  # gamma pushes out beta, not alpha (used after beta)
        out = cache.predict_mixed(imgs[:1], [name], topk=3)
        assert same(out[0], want[name][0])
    s = cache.stats()
    assert (s.hits, s.misses, s.evictions, s.resident, s.cold_reads) == (1, 3, 1, 2, 3)
    assert s.resident_mb <= s.budget_mb
    assert cache.predict_mixed(imgs[:1], ["alpha"])[0] and cache.stats().hits == 2  # alpha stayed
    cache.predict_mixed(imgs[:1], ["beta"])
    assert cache.stats().misses == 4  # beta had gone


def test_a_batch_larger_than_the_budget_runs_whole_and_answers_stay_the_same(reg, expected):
    imgs, want = expected
    cache = AdapterCache(Predictor(reg, device="cpu"), cache_mb=0, prefetch=False)
    for refs in (["alpha", "beta", "alpha", "beta"], ["gamma", "delta", "delta", "gamma"]):
        out = cache.predict_mixed(imgs, refs, topk=[3, 2, 3, 1])
        for i, (ref, got) in enumerate(zip(refs, out, strict=True)):
            assert same(got, want[ref][i][:[3, 2, 3, 1][i]])
    s = cache.stats()
    assert (s.hits, s.misses, s.evictions, s.resident) == (4, 4, 2, 2)  # the batch's own tasks, none kept after


def test_prefetch_reads_while_a_batch_holds_the_predictor(reg, expected):
    imgs, want = expected
    cache = AdapterCache(Predictor(reg, device="cpu"), cache_mb=64)
    with cache.lock:  # a batch computing: the read still happens
        cache.prefetch(["delta", "gamma", "delta"])
        deadline = time.monotonic() + 20
        while cache.stats().staged < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cache.stats().staged == 2
    out = cache.predict_mixed(imgs[:2], ["delta", "gamma"], topk=3)
    assert same(out[0], want["delta"][0]) and same(out[1], want["gamma"][1])
    s = cache.stats()
    assert (s.prefetched, s.cold_reads, s.staged, s.misses) == (2, 0, 0, 2)
    cache.prefetch(["delta", "nope"])  # resident, or unknown: nothing is read, nothing fails
    time.sleep(0.2)
    assert cache.stats().staged == 0
    cache.close()


def test_a_task_that_cannot_load_fails_only_its_own_requests(tmp_path, expected):
    imgs, want = expected
    reg = Registry(tmp_path / "registry.db")
    backbone = create_backbone(PICO, pretrained=False)
    register_random(reg, backbone, "alpha", seed=0)
    bad = register_random(reg, backbone, "broken", seed=9)
    reg.path_of(bad).write_bytes(b"not an adapter any more")
    cache = AdapterCache(Predictor(reg, device="cpu"), prefetch=False)
    out = cache.predict_mixed(imgs[:4], ["alpha", "broken", "missing", "alpha"], topk=3)
    assert same(out[0], want["alpha"][0]) and same(out[3], want["alpha"][3])
    assert isinstance(out[1], ArtifactError) and isinstance(out[2], NotFoundError)
    out = cache.predict_mixed([imgs[0], "/no/such/image.png"], ["alpha", "alpha"], topk=3)
    assert same(out[0], want["alpha"][0]) and "does not exist" in str(out[1])


def test_a_new_default_version_is_used_without_a_restart(tmp_path, expected):
    imgs, _ = expected
    reg = Registry(tmp_path / "registry.db")
    backbone = create_backbone(PICO, pretrained=False)
    register_random(reg, backbone, "alpha", seed=0)
    cache = AdapterCache(Predictor(reg, device="cpu"), resolve_ttl_s=0, prefetch=False)
    assert cache.resolve("alpha").ref == "alpha@1"
    cache.predict_mixed(imgs[:1], ["alpha"])
    register_random(reg, backbone, "alpha", seed=5)
    out = cache.predict_mixed(imgs[:1], ["alpha"], topk=3)
    assert cache.resolve("alpha").ref == "alpha@2"
    assert same(out[0], Predictor(reg, device="cpu").predict(imgs[:1], "alpha@2", topk=3)[0])


def test_concurrent_batches_from_many_threads_give_the_plain_answers(reg, expected):
    imgs, want = expected
    cache = AdapterCache(Predictor(reg, device="cpu"), cache_mb=1.5 * one_task_mb(reg))
    errors: list[str] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(6):
            refs = [NAMES[int(k)] for k in rng.integers(0, len(NAMES), len(imgs))]
            cache.prefetch(refs)
            for i, (ref, got) in enumerate(zip(refs, cache.predict_mixed(imgs, refs, topk=3), strict=True)):
                if not same(got, want[ref][i]):
                    errors.append(f"{ref} image {i}: {got}")

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = cache.stats()
    assert s.hits + s.misses == 4 * 6 * len(imgs)
    # batches in flight pin their tasks, so the budget may be exceeded while they overlap; the next batch alone
    # evicts back to it
    cache.predict_mixed(imgs[:1], ["alpha"])
    s = cache.stats()
    assert s.resident == 1 and s.resident_mb <= s.budget_mb and s.evictions == s.misses - 1 > 0
    cache.close()


def test_routed_prediction_through_the_cache_equals_the_predictors(reg, expected):
    imgs, _ = expected
    cache = AdapterCache(Predictor(reg, device="cpu"), cache_mb=0, prefetch=False)
    got = cache.predict_auto(imgs, topk=[2, 3, 1, 2])
    want = Predictor(reg, device="cpu").predict_auto(imgs, topk=3)
    for g, w, k in zip(got, want, [2, 3, 1, 2], strict=True):
        assert g.task == w.task and same(g.predictions, w.predictions[:k])


def test_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="cache_mb"):
        AdapterCache(Predictor(Registry(tmp_path / "r.db"), device="cpu"), cache_mb=-1)


def test_a_prefetched_task_that_is_resident_counts_as_used(reg):
    imgs = random_images(1)
    # resolve_ttl_s=0: alpha's row is always older than its reuse time when prefetch comes (a slow batch for beta
    # on a busy machine did that, and alpha was evicted); only eviction order depends on it
    cache = AdapterCache(Predictor(reg, device="cpu"), cache_mb=2.5 * one_task_mb(reg), resolve_ttl_s=0)
    cache.predict_mixed(imgs, ["alpha"])
    cache.predict_mixed(imgs, ["beta"])
    cache.prefetch(["alpha"])  # queued behind the next batch: not the one to evict for it
    cache.predict_mixed(imgs, ["gamma"])
    cache.predict_mixed(imgs, ["alpha"])
    assert cache.stats().hits == 1 and cache.stats().evictions == 1
    cache.close()

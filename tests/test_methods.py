"""Methods: identity at step 0, only the method's tensors train, closed-form parameter counts."""

from __future__ import annotations

import pytest
import torch

from adaptkit.backbone import create_backbone, fingerprint
from adaptkit.errors import ConfigError
from adaptkit.methods import get_method, merge_lora, unwrap

TEST_CASES = [
    ("adapter", {"placement": "parallel", "rank": 8}),
    ("adapter", {"placement": "sequential", "rank": 8}),
    ("adapter", {"placement": "houlsby", "rank": 4, "act": "relu"}),
    ("lora", {"rank": 4}),
    ("lora", {"rank": 4, "targets": ("qkv", "proj", "fc1", "fc2")}),
]
ALL_CASES = [*TEST_CASES, ("linear", {}), ("full", {})]


@pytest.mark.parametrize(("method", "config"), TEST_CASES)
def test_step_zero_equals_backbone_plus_head(pico, images, method, config):
    with torch.no_grad():
        feats = pico.model(images)
        task = get_method(method, config).attach(pico.model, num_classes=7)
        task.eval()
        assert torch.equal(task(images), task.head(feats))


@pytest.mark.parametrize(("method", "config"), ALL_CASES)
def test_only_method_tensors_change(pico, images, method, config):
    before = {k: v.clone() for k, v in pico.model.state_dict().items()}
    task = get_method(method, config).attach(pico.model, num_classes=5)
    start = {k: v.clone() for k, v in task.state().items()}
    opt = torch.optim.AdamW(task.trainable_parameters(), lr=1e-2)
    task.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(task(images), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = [k for k, v in task.state().items() if not torch.equal(v, start[k])]
    assert "head.weight" in changed
    if method != "linear":
        assert any(not k.startswith("head.") for k in changed), "the method's own tensors did not train"
    task.detach_from_trunk()
    after = pico.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "a backbone tensor changed"
    assert pico.fingerprint == fingerprint(unwrap(pico.model))


def test_detach_restores_exact_backbone_output(pico, images):
    with torch.no_grad():
        bare = pico.model(images)
        for method, config in TEST_CASES:
            task = get_method(method, config).attach(pico.model, num_classes=3)
            for p in task.trainable_parameters():
                torch.nn.init.normal_(p)
        task.ctx.active = None  # no task active: every site passes through to its base layer
        assert torch.equal(pico.model(images), bare)


@pytest.fixture(scope="module")
def vit_base():
    return create_backbone("vit_base_patch16_224", pretrained=False)


def test_parallel_adapter_count_matches_closed_form(vit_base):
    task = get_method("adapter", {"rank": 64}).attach(vit_base.model, num_classes=100)
    try:
        assert task.num_trainable() == 12 * (768 * 64 + 64 + 64 * 768 + 768) + (768 * 100 + 100)
    finally:
        task.detach_from_trunk()


def test_houlsby_lora_linear_full_counts(vit_base):
    head = 768 * 10 + 10
    cases = [
        ("adapter", {"rank": 8, "placement": "houlsby"}, 24 * (768 * 8 + 8 + 8 * 768 + 768) + head),
        ("lora", {"rank": 8}, 12 * (8 * 768 + 3 * 768 * 8) + head),
        ("linear", {}, head),
        ("full", {}, vit_base.num_params + head),
    ]
    for method, config, expected in cases:
        task = get_method(method, config).attach(vit_base.model, num_classes=10)
        assert task.num_trainable() == expected, method
        assert sum(t.numel() for t in task.state().values()) == expected
        task.detach_from_trunk()
    assert vit_base.num_params == 85_798_656


def test_lora_merge_equals_unmerged(pico, images):
    with torch.no_grad():
        feats = pico.model(images)
        task = get_method("lora", {"rank": 4, "targets": ("qkv", "fc2")}).attach(pico.model, num_classes=4)
        for p in task.trainable_parameters():
            torch.nn.init.normal_(p, std=0.1)
        task.eval()
        unmerged = task(images)
        assert not torch.allclose(unmerged, task.head(feats), atol=1e-3), "the LoRA update should matter"
        torch.testing.assert_close(merge_lora(task)(images), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("method", "config", "message"), [
    ("adapter", {"rank": 0}, "adapter rank must be a whole number in \\[1, 4096\\]"),
    ("adapter", {"placement": "inside"}, "placement must be one of"),
    ("lora", {"targets": ("nope",)}, "targets must be some of"),
    ("adapter", {"size": 3}, "unknown adapter setting"),
    ("prompt", {}, "unknown method 'prompt'"),
])
def test_bad_settings_raise_config_error(method, config, message):
    with pytest.raises(ConfigError, match=message):
        get_method(method, config)

"""Methods: identity at step 0, only the method's tensors train, closed-form parameter counts."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from adaptkit.backbone import create_backbone, fingerprint
from adaptkit.errors import ConfigError
from adaptkit.methods import get_method, merge_lora, merge_ssf, unwrap

TEST_CASES = [  # the methods that start as the identity
    ("adapter", {"placement": "parallel", "rank": 8}),
    ("adapter", {"placement": "sequential", "rank": 8}),
    ("adapter", {"placement": "houlsby", "rank": 4, "act": "relu"}),
    ("adapter", {"placement": "adapterplus", "init": "lora"}),
    ("lora", {"rank": 4}),
    ("lora", {"rank": 4, "targets": ("qkv", "proj", "fc1", "fc2")}),
    ("ssf", {}),
    ("bitfit", {}),
]
NEAR_IDENTITY = [("adapter", {"placement": "adapterplus"}), ("vpt", {"tokens": 4}),
                 ("vpt", {"tokens": 2, "mode": "shallow", "init": "normal"})]
ALL_CASES = [*TEST_CASES, *NEAR_IDENTITY, ("linear", {}), ("full", {})]


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
        for method, config in [*TEST_CASES, *NEAR_IDENTITY]:
            task = get_method(method, config).attach(pico.model, num_classes=3)
            for p in task.trainable_parameters():
                torch.nn.init.normal_(p)
        task.ctx.active = None  # no task active: every site passes through to its base layer
        assert torch.equal(pico.model(images), bare)


@pytest.fixture(scope="module")
def vit_base(tmp_path_factory):
    """ViT-B/16 for counting parameters: timm's own random initialisation, read from a file (seconds, where adaptkit's
    seeded random weights take about 20 s for ViT-B; the counts do not depend on the values)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("vit-base") / "w.safetensors"
    state = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return create_backbone("vit_base_patch16_224", weights=path)


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
    ("adapter", {"scaling": "vector"}, "scaling must be one of scalar, channel"),
    ("adapter", {"placement": "adapterplus", "init": "zero"}, "init must be one of lora, houlsby"),
    ("vpt", {"tokens": 0}, "tokens must be a positive integer"),
    ("vpt", {"tokens": 2.5}, "tokens must be a positive integer"),
    ("vpt", {"mode": "middle"}, "mode must be one of deep, shallow"),
    ("vpt", {"init": "zeros"}, "init must be one of xavier, normal"),
    ("vpt", {"dropout": 1.0}, "dropout must be in"),
    ("ssf", {"rank": 4}, "unknown ssf setting"),
    ("bitfit", {"targets": ("qkv",)}, "unknown bitfit setting"),
    ("prompt", {}, "unknown method 'prompt'"),
])
def test_bad_settings_raise_config_error(method, config, message):
    with pytest.raises(ConfigError, match=message):
        get_method(method, config)


def test_new_methods_count_in_closed_form(vit_base):
    """ViT-B/16: d=768, 12 blocks, MLP 3072, biases everywhere; the published sizes are SSF 0.21 M, BitFit 0.10 M,
    VPT-deep (10 tokens) 0.09 M and Adapter+ (rank 8) 0.16 M."""
    d, depth, hidden, head = 768, 12, 3072, 768 * 10 + 10
    per_block = {"norm1": d, "qkv": 3 * d, "proj": d, "norm2": d, "fc1": hidden, "fc2": d}  # output channels
    outside = 2 * d  # patch embedding and final norm
    cases = [
        ("ssf", {}, 2 * (depth * sum(per_block.values()) + outside) + head),
        ("bitfit", {}, depth * sum(per_block.values()) + outside + head),
        ("vpt", {"tokens": 10}, depth * 10 * d + head),
        ("vpt", {"tokens": 50, "mode": "shallow"}, 50 * d + head),
        ("adapter", {"placement": "adapterplus"}, depth * (d * 8 + 8 + 8 * d + d + d) + head),
    ]
    for method, config, expected in cases:
        task = get_method(method, config).attach(vit_base.model, num_classes=10)
        assert task.num_trainable() == expected, (method, config)
        assert sum(t.numel() for t in task.state().values()) == expected
        task.detach_from_trunk()
    assert [round(n / 1e6, 2) for n in (205_824, 102_912, 92_160, 165_984)] == [0.21, 0.10, 0.09, 0.17]


@pytest.mark.parametrize("method", ["ssf", "bitfit"])
def test_ssf_merge_equals_unmerged(pico, images, method):
    with torch.no_grad():
        feats = pico.model(images)
        task = get_method(method).attach(pico.model, num_classes=4)
        for name, p in task.named_trainable_parameters():
            torch.nn.init.normal_(p, mean=1.0 if name.endswith(".scale") else 0.0, std=0.1)
        task.eval()
        unmerged = task(images)
        assert not torch.allclose(unmerged, task.head(feats), atol=1e-3), "the scales and shifts should matter"
        merged = merge_ssf(task)
        assert not any("Site" in type(m).__name__ for m in merged.modules())
        torch.testing.assert_close(merged(images), unmerged, atol=1e-5, rtol=1e-5)
    assert pico.fingerprint == fingerprint(unwrap(pico.model)), "merging changed the shared backbone"


def test_bitfit_deltas_equal_training_the_biases(pico, images):
    """A task's bias deltas give the same output as a copy of the backbone whose own biases moved by them."""
    with torch.no_grad():
        task = get_method("bitfit").attach(pico.model, num_classes=3)
        for p in task.trainable_parameters():
            torch.nn.init.normal_(p, std=0.1)
        task.eval()
        moved = unwrap(copy.deepcopy(pico.model))
        for name, module in task.parts.items():
            moved.get_submodule(name.rsplit(".", 1)[0]).bias.add_(module.shift)
        torch.testing.assert_close(task(images), task.head(moved(images)), atol=1e-5, rtol=1e-5)
        assert set(task.parts) == {n.rsplit(".", 1)[0] + ".bias_delta" for n, _ in moved.named_parameters()
                                   if n.endswith(".bias")}


def _prompted_reference(trunk, images, prompts: list[torch.Tensor | None]) -> torch.Tensor:
    """VPT written out: the prompts of block i (None: carry the previous ones) enter before it; removed at the end."""
    x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))
    n = x.shape[1]
    for block, p in zip(trunk.blocks, prompts, strict=True):
        if p is not None:
            x = torch.cat([x[:, :n], p.expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    return trunk.forward_head(trunk.norm(x[:, :n]), pre_logits=True)


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("mode", ["deep", "shallow"])
def test_vpt_equals_prompts_written_out(images, mode, pool):
    trunk = timm.create_model("vit_pico_patch4_32", pretrained=False, num_classes=0, global_pool=pool).eval()
    trunk.requires_grad_(False)
    with torch.no_grad():
        bare = trunk(images)
        task = get_method("vpt", {"tokens": 3, "mode": mode}).attach(trunk, num_classes=5)
        task.eval()
        prompts = [m.tokens for m in task.parts.values()]
        assert [p is not None for p in prompts] == ([True] * 4 if mode == "deep" else [True, False, False, False])
        feats = _prompted_reference(unwrap(copy.deepcopy(trunk)), images, prompts)
        torch.testing.assert_close(task(images), task.head(feats), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(feats, bare, atol=1e-3), "the prompts should change the features"
        task.ctx.active = None
        assert torch.equal(trunk(images), bare)


def test_vpt_init_follows_the_paper(pico):
    task = get_method("vpt", {"tokens": 50}).attach(pico.model, num_classes=2)
    bound = (6 / (3 * 4 * 4 + 64)) ** 0.5  # patch 4x4, width 64
    tokens = torch.stack([m.tokens for m in task.parts.values()])
    assert tokens.abs().max() <= bound and tokens.abs().max() > 0.9 * bound
    assert abs(tokens.mean().item()) < 0.02


def test_one_pass_over_every_method_equals_each_sample_alone(pico):
    """The trunk run once over a batch that mixes tasks of every shared-trunk method, VPT tasks with 4 (deep), 2 and
    5 (shallow) prompts among them, so prompt slots are padded and masked; each sample equals its task alone."""
    cases = [*TEST_CASES, *NEAR_IDENTITY, ("vpt", {"tokens": 5, "mode": "shallow"}), ("linear", {})]
    torch.manual_seed(0)
    tasks = []
    for method, config in cases:
        task = get_method(method, config).attach(pico.model, num_classes=3)
        for p in task.trainable_parameters():
            torch.nn.init.normal_(p, std=0.1)
        tasks.append(task.eval())
    x = torch.randn(len(tasks) + 2, 3, 32, 32)
    owner = [*range(len(tasks)), 9, 11]  # two more samples of VPT tasks
    ctx = tasks[0].ctx
    with torch.no_grad():
        ctx.slot_order = tuple(t.slot for t in tasks)
        ctx.sample_slots = torch.tensor(owner)
        try:
            mixed = pico.model(x)
        finally:
            ctx.sample_slots = None
        for b, i in enumerate(owner):
            ctx.active = tasks[i].slot
            torch.testing.assert_close(mixed[b], pico.model(x[b : b + 1])[0], atol=1e-5, rtol=1e-5,
                                       msg=f"sample {b} ({cases[i]})")


def test_concurrent_calls_on_one_backbone_each_apply_their_own_task(pico):
    """The active task and a mixed batch's slots belong to the calling thread: threads running different tasks (and
    mixes) on one trunk at once give exactly the answers each gives alone."""
    import threading

    torch.manual_seed(0)
    tasks = []
    for method, config in [("adapter", {}), ("lora", {}), ("ssf", {}), ("vpt", {"tokens": 3})]:
        task = get_method(method, config).attach(pico.model, num_classes=3)
        for p in task.trainable_parameters():
            torch.nn.init.normal_(p, std=0.1)
        tasks.append(task.eval())
    x = torch.randn(6, 3, 32, 32)
    mixes = [(0, 1, 2, 3, 0, 1), (3, 3, 2, 2, 1, 0), (1, 0, 1, 0, 1, 0)]
    ctx = tasks[0].ctx

    def mixed(owner: tuple[int, ...]) -> torch.Tensor:
        with ctx.using(slot_order=tuple(t.slot for t in tasks), sample_slots=torch.tensor(owner)):
            return pico.model(x)

    with torch.no_grad():
        alone = [task(x) for task in tasks]
        alone_mixed = [mixed(m) for m in mixes]
    results: dict[tuple[str, int], list[torch.Tensor]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(tasks) + len(mixes))

    def run(key: tuple[str, int], fn) -> None:
        try:
            start.wait()
            with torch.no_grad():
                results[key] = [fn() for _ in range(15)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(("task", i), lambda t=t: t(x))) for i, t in enumerate(tasks)]
    threads += [threading.Thread(target=run, args=(("mix", i), lambda m=m: mixed(m))) for i, m in enumerate(mixes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for (kind, i), outs in results.items():
        want = alone[i] if kind == "task" else alone_mixed[i]
        for out in outs:
            assert torch.equal(out, want), (kind, i)
    assert ctx.active == tasks[-1].slot and ctx.sample_slots is None  # this thread's choice, untouched by the others

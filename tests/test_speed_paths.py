"""The fast paths of serving stay correct: mixed batches, merged LoRA, switching and unloading tasks.

Every test runs a random-weight ViT (the 32x32 test ViT: the paths are the same as at any size, at a fraction of the
cost) on the CPU with tasks whose weights are drawn at random (not zero), so that each task changes the output and a
wrong slot, a missing module or a stale bank shows up in the logits.
"""

import pytest
import torch
from conftest import PICO, task_meta

from adaptkit.backbone import create_backbone
from adaptkit.inference import Predictor
from adaptkit.methods import get_method, merge_lora, merge_ssf, unwrap
from adaptkit.methods.base import TaskSite
from adaptkit.registry import Registry

BACKBONE = PICO

# task -> (method, config, number of classes)
TASKS = {
    "par8": ("adapter", {"rank": 8, "placement": "parallel"}, 3),
    "seq4": ("adapter", {"rank": 4, "placement": "sequential"}, 4),
    "houlsby": ("adapter", {"rank": 8, "placement": "houlsby"}, 5),
    "lora4": ("lora", {"rank": 4, "targets": ["qkv", "fc1"]}, 6),
    "linear": ("linear", {}, 7),
    "full": ("full", {}, 8),
    "ssf": ("ssf", {}, 3),
    "bitfit": ("bitfit", {}, 4),
    "vpt3": ("vpt", {"tokens": 3}, 5),
    "vpt10s": ("vpt", {"tokens": 10, "mode": "shallow"}, 6),
    "adapterplus": ("adapter", {"placement": "adapterplus"}, 7),
}


def _register(reg: Registry, tasks: dict) -> None:
    """Write each task with random, non-zero weights to ``reg`` (a full task's trunk is perturbed, not redrawn)."""
    backbone = create_backbone(BACKBONE, pretrained=False)
    for seed, (name, (method, config, num_classes)) in enumerate(tasks.items()):
        torch.manual_seed(seed)
        task = get_method(method, config).attach(backbone.model, num_classes)
        with torch.no_grad():
            for pname, p in task.named_trainable_parameters():
                if pname.startswith("backbone."):
                    p.add_(torch.randn_like(p) * 0.01)
                else:
                    torch.nn.init.normal_(p, std=0.05)
        reg.add_version(task_meta(backbone, name, task, [f"c{i}" for i in range(num_classes)]), task.state())
        task.detach_from_trunk()
    unwrap(backbone.model)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("speed") / "reg.db")
    _register(reg, TASKS)
    return reg


@pytest.fixture
def own_registry(tmp_path) -> Registry:
    """A registry this test may damage (files deleted)."""
    reg = Registry(tmp_path / "reg.db")
    _register(reg, {k: TASKS[k] for k in ("par8", "lora4", "houlsby", "ssf", "vpt10s")})
    return reg


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_mixed_batch_equals_each_sample_alone(registry, images):
    refs = ["lora4", "par8", "full", "seq4", "houlsby", "linear", "par8", "lora4"]
    predictor = Predictor(registry, device="cpu")
    mixed = predictor.logits_mixed(images, refs)
    for i, ref in enumerate(refs):
        alone = predictor.logits(images[i : i + 1], ref)[0]
        assert mixed[i].shape == (TASKS[ref][2],)
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-5, msg=f"sample {i} ({ref})")


def test_mixed_batch_of_every_method_equals_each_sample_alone(registry):
    """Every method in one batch, VPT tasks with 3 (deep) and 10 (shallow) prompts among tasks without prompts."""
    refs = [*TASKS, "vpt10s", "ssf", "vpt3"]
    x = torch.randn(len(refs), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    predictor = Predictor(registry, device="cpu")
    mixed = predictor.logits_mixed(x, refs)
    for i, ref in enumerate(refs):
        alone = predictor.logits(x[i : i + 1], ref)[0]
        assert mixed[i].shape == (TASKS[ref][2],)
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-5, msg=f"sample {i} ({ref})")


def test_mixed_batch_of_one_prompt_task_equals_its_batch(registry, images):
    """A mixed batch whose samples all have prompts of one length (no padding, no mask) equals a plain batch."""
    predictor = Predictor(registry, device="cpu")
    for ref in ("vpt3", "vpt10s"):
        mixed = predictor.logits_mixed(images[:3], [ref] * 3)
        torch.testing.assert_close(torch.stack(mixed), predictor.logits(images[:3], ref), atol=1e-5, rtol=1e-5)


def test_merged_ssf_equals_unmerged(registry, images):
    predictor = Predictor(registry, device="cpu")
    unmerged = predictor.logits(images[:2], "ssf")
    torch.testing.assert_close(merge_ssf(predictor.load("ssf").model)(images[:2]), unmerged, atol=1e-5, rtol=1e-5)


def test_merged_lora_equals_unmerged(registry, images):
    x = images[:4]
    plain = Predictor(registry, device="cpu")
    unmerged = plain.logits(x, "lora4")
    task = plain.load("lora4")
    torch.testing.assert_close(merge_lora(task.model)(x), unmerged, atol=1e-5, rtol=1e-5)
    merged_predictor = Predictor(registry, device="cpu", merge_lora=True)
    torch.testing.assert_close(merged_predictor.logits(x, "lora4"), unmerged, atol=1e-5, rtol=1e-5)
    assert merged_predictor._merged is not None  # the merged copy really served the call


def test_switching_is_exact_and_rebuilds_nothing(own_registry, images, monkeypatch):
    x = images[:2]
    predictor = Predictor(own_registry, device="cpu")
    for ref in ("par8", "lora4", "houlsby"):
        predictor.load(ref)
    trunk = predictor.load("par8").host.backbone.model
    modules_before = {name: id(m) for name, m in trunk.named_modules()}

    for f in own_registry.adapter_dir.rglob("*.safetensors"):  # a switch must not read a file ...
        f.unlink()

    def no_query(*args, **kwargs):  # ... nor ask the registry
        raise AssertionError("activate of a resident task queried the registry")

    monkeypatch.setattr(own_registry, "get_version", no_query)

    outputs = []
    for ref in ("par8", "lora4", "par8", "houlsby", "par8"):
        predictor.activate(ref)
        outputs.append(predictor.logits(x))
    assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[0], outputs[4])
    assert outputs[0].shape == (2, 3) and outputs[1].shape == (2, 6)
    assert not torch.allclose(outputs[3][:, :3], outputs[0], atol=1e-3)  # houlsby's head is not par8's
    assert {name: id(m) for name, m in trunk.named_modules()} == modules_before


def test_switching_changes_the_trunk_features(own_registry, images):
    """Two tasks that share a trunk give different features: the switch reaches the sites, not just the head."""
    predictor = Predictor(own_registry, device="cpu")
    a, b = predictor.load("par8"), predictor.load("houlsby")
    with torch.inference_mode():
        predictor.activate("par8")
        fa = a.model.trunk(images[:2])
        predictor.activate("houlsby")
        fb = b.model.trunk(images[:2])
        predictor.activate("par8")
        fa2 = a.model.trunk(images[:2])
    assert torch.equal(fa, fa2)
    assert not torch.allclose(fa, fb, atol=1e-4)


@pytest.mark.parametrize("ref", ["par8", "houlsby", "lora4", "ssf", "vpt10s"])
def test_unload_restores_the_backbone(own_registry, images, ref):
    x = images[:2]
    with torch.inference_mode():
        reference = create_backbone(BACKBONE, pretrained=False).model(x)
        predictor = Predictor(own_registry, device="cpu")
        task = predictor.load(ref)
        trunk = task.host.backbone.model
        predictor.activate(ref)
        adapted = trunk(x)
        assert not torch.allclose(adapted, reference, atol=1e-4)  # the task really changed the trunk's output

        predictor.unload(ref)
        assert predictor.active is None
        assert all(len(s.tasks) == 0 for s in trunk.modules() if isinstance(s, TaskSite))
        assert torch.equal(trunk(x), reference)  # the stale active slot names nothing any more
        task.model.ctx.active = None
        assert torch.equal(trunk(x), reference)


def test_unloaded_task_reloads_from_its_file(own_registry, images):
    x = images[:2]
    predictor = Predictor(own_registry, device="cpu")
    before = predictor.logits(x, "par8")
    predictor.unload("par8")
    assert "par8" not in predictor._refs
    assert torch.equal(predictor.logits(x, "par8"), before)


@pytest.mark.parametrize("gather", [True, False])
def test_mixed_heads_give_each_sample_its_own_heads_logits(monkeypatch, gather):
    """Heads of one size run as one batched product (weights gathered per sample) or, when that gather would be
    large, one call each; either way sample b gets exactly its own head's logits, in order, as float32."""
    from adaptkit.inference import predictor

    if not gather:
        monkeypatch.setattr(predictor, "_HEAD_GATHER", 0)
    torch.manual_seed(0)
    heads = [torch.nn.Linear(16, c) for c in (3, 3, 5, 5, 7)]
    owner = [0, 2, 1, 0, 4, 3, 2, 2]
    feats = torch.randn(len(owner), 16)
    with torch.inference_mode():
        got = predictor._heads(feats, [heads[i] for i in owner])
        for b, i in enumerate(owner):
            assert got[b].dtype == torch.float32
            torch.testing.assert_close(got[b], heads[i](feats[b]), atol=1e-6, rtol=1e-5)


def test_a_registered_file_is_hashed_once_and_its_modules_built_without_initialising(own_registry, images,
                                                                                      monkeypatch):
    """Loading a registered file checks the whole file's recorded sha256 and does not hash its tensors a second
    time (a file with no recorded hash still checks its own tensor hash); the modules the saved tensors go into are
    built on the meta device without running ``torch.nn.init``, and the task still answers as before."""
    from adaptkit import artifacts
    from adaptkit.methods.skeleton import skeleton

    x = images[:2]
    predictor = Predictor(own_registry, device="cpu")
    before = predictor.logits(x, "par8")
    predictor.unload("par8")
    hashed, inits = [], []
    real_hash, real_normal = artifacts.tensors_sha256, torch.nn.init.normal_
    monkeypatch.setattr(artifacts, "tensors_sha256", lambda t: hashed.append(1) or real_hash(t))
    real_fan = torch.nn.init._calculate_correct_fan  # what kaiming_uniform_ computes once it runs
    monkeypatch.setattr(torch.nn.init, "_calculate_correct_fan", lambda t, m: inits.append(t) or real_fan(t, m))
    assert torch.equal(predictor.logits(x, "par8"), before)
    assert hashed == [] and inits == []
    row = own_registry.get_version("par8")
    artifacts.load_adapter(own_registry.path_of(row))  # no recorded hash: the tensors are hashed
    assert hashed == [1]

    real = torch.zeros(3)
    with skeleton():
        layer = torch.nn.Linear(4, 2)
        real_normal(real)  # a tensor on a real device is initialised as usual
    assert layer.weight.is_meta and not torch.equal(real, torch.zeros(3))


def test_loading_a_version_reads_the_registry_once_and_takes_the_files_tensors(own_registry):
    """``get_version`` reads the task, its versions and their backbones in one SQL statement (a load paid for three),
    and a task attached with a saved state holds that state's tensors themselves (no copy), trainable as before."""
    from sqlalchemy import event

    statements = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731  (conn, cursor, statement, ...)
    event.listen(own_registry.engine, "before_cursor_execute", listener)
    try:
        row = own_registry.get_version("par8")
        assert row.ref == "par8@1" and row.backbone.name == BACKBONE and row.problem is None
    finally:
        event.remove(own_registry.engine, "before_cursor_execute", listener)
    assert [q.split()[0] for q in statements if q != "BEGIN"] == ["SELECT"], statements

    backbone = create_backbone(BACKBONE, pretrained=False)
    state, meta = own_registry.load_version(row)
    task = get_method(meta.method, meta.method_config).attach(backbone.model, len(meta.classes), state=state)
    own = dict(task.named_trainable_parameters())
    assert own.keys() == state.keys()
    for name, p in own.items():
        assert p.data_ptr() == state[name].data_ptr() and p.requires_grad and isinstance(p, torch.nn.Parameter), name


@pytest.mark.parametrize("ref", ["lora4", "par8", "houlsby"])
def test_serving_adds_the_update_into_the_layers_output_and_training_does_not(own_registry, images, ref):
    """Without autograd (serving) a site adds its task's update into its layer's fresh output, alone and in a mixed
    batch, so no second tensor of the output's size is made; with autograd on the sum is a new tensor (the output
    may be saved for the backward pass) and the two agree."""
    predictor = Predictor(own_registry, device="cpu")
    task = predictor.load(ref)
    site = next(iter(task.model.sites.values()))
    outputs = []
    handle = site.base_layer.register_forward_hook(lambda m, i, out: outputs.append(out))
    returned = []
    site_hook = site.register_forward_hook(lambda m, i, out: returned.append(out))
    x = images[:2]
    try:
        with torch.inference_mode():
            alone = predictor.logits(x, ref)
            mixed = predictor.logits_mixed(x, [ref, "ssf"])
        assert len(outputs) == 2 and all(o is r for o, r in zip(outputs, returned, strict=True))
        outputs.clear(), returned.clear()
        task.model.ctx.active = task.model.slot
        with torch.enable_grad():
            graded = task.model(x)
        assert len(outputs) == 1 and outputs[0] is not returned[0]
    finally:
        handle.remove(), site_hook.remove()
    torch.testing.assert_close(graded.detach(), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], alone[0], atol=1e-5, rtol=1e-5)

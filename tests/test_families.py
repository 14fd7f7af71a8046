"""Every method on every ViT family (tests/family_cases.py), through every path a task takes: train, registry round
trip, mixed batches, merging, the frozen prefix of routed prediction, ONNX, PEFT; and a failed attach leaves the
backbone bit-identical. Each family's backbone has random weights with every bias non-zero (its q/v biases too), so
a bias applied twice or dropped shows."""

from __future__ import annotations

import copy
import os

import pytest
import timm
import torch
from conftest import task_meta
from family_cases import CASES, FamilyCase
from safetensors.torch import save_file

from adaptkit.backbone import create_backbone
from adaptkit.errors import ConfigError
from adaptkit.families import family_of, outside_bias
from adaptkit.inference import Predictor
from adaptkit.methods import get_method, merge_lora, merge_ssf
from adaptkit.methods.base import plain_copy
from adaptkit.methods.sites import TaskSite
from adaptkit.trunk import run_prefix, run_suffix, splittable

METHODS = ["adapter", "lora", "ssf", "bitfit", "vpt", "linear", "full"]
SETTINGS = {"lora": {"targets": "qkv,proj,fc1,fc2", "rank": 2}, "adapter": {"rank": 4}, "vpt": {"tokens": 3}}
LAST = {"adapter": {"placement": "houlsby"}, "lora": {"targets": "qkv"}}  # an adapter on the attention too
TOL = {"atol": 1e-5, "rtol": 1e-5}
ONNX_QUICK = ("eva02", "eva02_qkv", "beit")  # ONNX graphs in every run; the others with ADAPTKIT_FULL_MATRIX=1


def _applies(method: str, trunk: torch.nn.Module) -> bool:
    return get_method(method, SETTINGS.get(method)).refusal(trunk) is None


@pytest.fixture(scope="module", params=CASES, ids=[c.key for c in CASES])
def fam(request, tmp_path_factory):
    """A family's backbone (random weights with non-zero biases, from a file) and a registry with one task per
    method that applies, each built in memory with random parameters and registered."""
    case: FamilyCase = request.param
    folder = tmp_path_factory.mktemp(case.key)
    torch.manual_seed(0)
    model = timm.create_model(case.name, num_classes=0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # BEiT's relative position tables start at zero: random too
            p.normal_(0, 0.2) if p.dim() < 2 or "relative_position" in name else p.mul_(1.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "w.safetensors")
    backbone = create_backbone(case.name, weights=folder / "w.safetensors")
    registry = folder / "r.db"
    from adaptkit.registry import Registry

    reg = Registry(registry)
    tasks = {}
    kinds = [(m, m, SETTINGS.get(m)) for m in METHODS] + [  # and tasks in the last block only (a frozen prefix)
        (f"last-{m}", m, {**SETTINGS.get(m, {}), **LAST.get(m, {}), "blocks": 1}) for m in ("adapter", "lora", "vpt")]
    for ref, method, settings in kinds:
        if not _applies(method, backbone.model):
            continue
        task = get_method(method, settings).attach(backbone.model, 3)
        with torch.no_grad():
            for name, p in task.named_trainable_parameters():
                if method != "full" or not name.startswith("backbone.blocks.0.attn"):  # full: change a few
                    p.add_(torch.randn_like(p) * 0.05)
        task.eval()
        reg.add_version(task_meta(backbone, ref, task, ["a", "b", "c"]), task.state())
        tasks[ref] = task
    x = torch.randn(4, *backbone.data_config["input_size"])
    return case, backbone, reg, tasks, x


def test_every_method_backpropagates_at_the_input_size(fam):
    case, backbone, _, tasks, x = fam
    assert set(tasks) >= set(METHODS), f"{case.key}: a method was refused"
    for method, task in tasks.items():
        task.train()
        task(x).logsumexp(1).sum().backward()
        grads = [p.grad for p in task.trainable_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{case.key}/{method}"
        assert any(g.abs().sum() > 0 for g in grads), f"{case.key}/{method}: no gradient reaches the parameters"
        task.zero_grad(set_to_none=True)
        task.eval()


def test_registry_round_trip_and_mixed_batches_equal_each_task_alone(fam):
    case, backbone, reg, tasks, x = fam
    predictor = Predictor(reg, device="cpu")
    refs = list(tasks) + list(tasks)[:2]
    xs = torch.randn(len(refs), *x.shape[1:])
    mixed = predictor.logits_mixed(xs, refs)
    for b, ref in enumerate(refs):
        with torch.no_grad():
            want = tasks[ref](xs[b : b + 1])[0]
        torch.testing.assert_close(predictor.logits(xs[b : b + 1], ref)[0], want, **TOL,
                                   msg=f"{case.key}/{ref}: loaded != in memory")
        torch.testing.assert_close(mixed[b], want, **TOL, msg=f"{case.key}/{ref}: mixed != alone")


@pytest.mark.parametrize("method", ["lora", "ssf", "bitfit"])
def test_merged_equals_unmerged(fam, method):
    case, _, _, tasks, x = fam
    task = tasks[method]
    merged = (merge_lora if method == "lora" else merge_ssf)(task)
    assert not any(isinstance(m, TaskSite) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), task(x), atol=1e-4, rtol=1e-4, msg=f"{case.key}/{method}")


def test_bitfit_counts_the_q_v_bias_the_attention_holds(fam):
    """On a fused qkv whose attention adds q_bias / v_bias itself, BitFit gets a delta there (its bias)."""
    case, backbone, _, tasks, _ = fam
    held = outside_bias(backbone.model, "blocks.0.attn.qkv")
    attn = plain_copy(backbone.model).blocks[0].attn
    assert held == (getattr(attn, "q_bias", None) is not None and getattr(attn, "qkv", None) is not None), case.key
    if getattr(attn, "qkv", None) is not None and attn.qkv.bias is None:
        assert ("blocks.0.attn.qkv.bias_delta" in tasks["bitfit"].parts) == held, case.key


def test_frozen_prefix_of_routed_prediction_equals_a_full_pass(fam):
    """Tasks in the last block only: the shared frozen prefix (the trunk split) gives every task its own logits."""
    case, backbone, reg, tasks, x = fam
    trunk = backbone.model
    assert splittable(trunk), f"{case.key}: no trunk split for {type(trunk).__name__}"
    with torch.no_grad():
        plain = trunk(x)  # the tasks here are idle: the bare backbone
        for k in range(len(trunk.blocks) + 1):
            assert torch.equal(run_suffix(trunk, run_prefix(trunk, x, k), k), plain), f"{case.key}: split at {k}"
    predictor = Predictor(reg, device="cpu")
    refs = ["linear", *(r for r in tasks if r.startswith("last-"))]
    feats, prefix = predictor.frozen_prefix(x, [predictor.load(r) for r in refs])
    assert prefix is not None and prefix.start == len(trunk.blocks) - 1, case.key
    torch.testing.assert_close(feats, predictor.frozen_features(x, predictor.load("linear")), **TOL)
    mix = [refs[b % len(refs)] for b in range(len(x))]
    for got, want in zip(predictor.logits_mixed(x, mix, prefix), predictor.logits_mixed(x, mix), strict=True):
        torch.testing.assert_close(got, want, **TOL, msg=case.key)


def _structure(trunk: torch.nn.Module) -> list:
    flags = [(n, m.__dict__.get("qkv_bias_separate"), "_adaptkit_restore" in m.__dict__) for n, m in
             trunk.named_modules()]
    return [(n, type(m).__name__) for n, m in trunk.named_modules()] + flags + [sorted(trunk.__dict__)]


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_a_failed_attach_leaves_the_backbone_bit_identical(case, monkeypatch):
    backbone = create_backbone(case.name, pretrained=False)
    trunk = backbone.model
    before_plain = _structure(trunk)
    other = get_method("adapter").attach(trunk, 3)
    torch.manual_seed(1)
    x = torch.randn(2, *backbone.data_config["input_size"])
    with torch.no_grad():
        for p in other.trainable_parameters():
            p.normal_(0, 0.1)
        want = other(x)
    structure, state = _structure(trunk), copy.deepcopy(trunk.state_dict())
    add = TaskSite.add
    for method in ("lora", "ssf", "bitfit", "vpt"):
        if not _applies(method, trunk):
            continue
        calls = []

        def failing(self, slot, module, calls=calls):
            calls.append(slot)
            if len(calls) == 2:  # the first site is in, the second fails
                raise RuntimeError("forced failure mid-attach")
            return add(self, slot, module)

        monkeypatch.setattr(TaskSite, "add", failing)
        with pytest.raises(RuntimeError, match="forced"):
            get_method(method, SETTINGS.get(method)).attach(trunk, 3)
        monkeypatch.setattr(TaskSite, "add", add)
        assert _structure(trunk) == structure, f"{case.key}/{method}: modules left behind"
        after = trunk.state_dict()
        assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state), case.key
        with torch.no_grad():
            assert torch.equal(other(x), want), f"{case.key}/{method}: another task's answer changed"
    other.detach_from_trunk()
    assert _structure(trunk)[:-1] == before_plain[:-1]


@pytest.mark.parametrize("shared", [False, True], ids=["bias-per-block", "shared-bias"])
def test_vpt_prompts_on_beit_have_zero_relative_position_bias_and_mix(shared):
    """BEiT's relative position bias (each attention's own, or one shared by the blocks) gets zero rows and columns
    for VPT's prompts, the backbone's own tokens keep theirs; a batch mixing VPT tasks of 2 (deep), 4 (shallow) and 3
    (last block) prompts with LoRA and adapter tasks gives each sample its task's answer alone."""
    from adaptkit.families import added_tokens, tokens_kwargs

    case = next(c for c in CASES if c.key == "beit")
    kwargs = {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False} if shared else {}
    torch.manual_seed(0)
    trunk = timm.create_model(case.name, **kwargs)
    with torch.no_grad():
        for name, p in trunk.named_parameters():
            if "relative_position" in name:
                p.normal_(0, 1.0)
    assert family_of(trunk).prompts is None
    owner = trunk.rel_pos_bias if shared else trunk.blocks[0].attn
    own = owner() if shared else owner._get_rel_pos_bias()
    n = own.shape[-1]
    with added_tokens(4):
        padded = tokens_kwargs({"shared_rel_pos_bias": own}, 4)["shared_rel_pos_bias"] if shared else \
            owner._get_rel_pos_bias()
    assert padded.shape[-2:] == (n + 4, n + 4) and torch.equal(padded[..., :n, :n], own)
    assert not padded[..., n:, :].any() and not padded[..., n:].any(), "a prompt row or column has a bias"
    configs = [("vpt", {"tokens": 2}), ("vpt", {"tokens": 4, "mode": "shallow"}), ("vpt", {"tokens": 3, "blocks": 1}),
               ("lora", {"targets": "qkv,proj", "rank": 2}), ("adapter", {"placement": "houlsby", "rank": 4})]
    tasks = []
    for method, config in configs:
        task = get_method(method, config).attach(trunk, 3)
        with torch.no_grad():
            for p in task.trainable_parameters():
                p.normal_(0, 0.1)
        tasks.append(task.eval())
    x = torch.randn(7, 3, 32, 32)
    owners = (0, 1, 2, 3, 4, 1, 0)
    ctx = tasks[0].ctx
    with torch.no_grad():
        with ctx.using(slot_order=tuple(t.slot for t in tasks), sample_slots=torch.tensor(owners)):
            mixed = trunk(x)
        for b, i in enumerate(owners):
            ctx.active = tasks[i].slot
            torch.testing.assert_close(mixed[b], trunk(x[b : b + 1])[0], **TOL, msg=f"sample {b} {configs[i]}")
    for task in tasks:
        task.detach_from_trunk()


def test_a_family_that_cannot_take_prompts_refuses_vpt_before_anything_is_built(tmp_path, monkeypatch):
    """The refusal stays generic: a family entry whose ``prompts`` says why (none does today) makes ``train`` refuse
    VPT in one line naming the methods that apply, with the backbone untouched."""
    from dataclasses import replace

    from adaptkit import families
    from adaptkit.training import train

    backbone = create_backbone(CASES[0].name, pretrained=False)
    name = family_of(backbone.model).name
    monkeypatch.setattr(families, "FAMILIES", tuple(replace(f, prompts="no token can join its sequence")
                                                    if f.name == name else f for f in families.FAMILIES))
    before = _structure(backbone.model)
    with pytest.raises(ConfigError, match=rf"^vpt cannot adapt a {name} backbone .*: no token can join its sequence; "
                                          r"pick one of adapter, .*lora"):
        train("folder:/does/not/exist", task="t", backbone=backbone, method="vpt", registry=tmp_path / "r.db")
    assert _structure(backbone.model) == before and not (tmp_path / "r.db").exists()


def test_train_runs_every_method_and_caches_the_frozen_blocks(fam, cifar_mini, monkeypatch):
    from adaptkit.training import TrainConfig, train

    case, backbone, reg, tasks, x = fam
    config = TrainConfig(epochs=1, batch_size=8, limit_train=8, limit_eval=4, threads=1)
    predictor = Predictor(reg, device="cpu")
    for method in (m for m in METHODS if m in tasks):
        result = train(f"folder:{cifar_mini}", task=f"trained-{method}", backbone=backbone, method=method,
                       method_config=SETTINGS.get(method), config=config, registry=reg, classes="0-1")
        assert result.version.method == method, case.key
        again = result.model if method == "full" else result.model.method.attach(backbone.model, 2,
                                                                                   state=result.model.state())
        with torch.no_grad():
            want = again.eval()(x)
        if method != "full":
            again.detach_from_trunk()
        torch.testing.assert_close(predictor.logits(x, result.version.ref), want, **TOL, msg=f"{case.key}/{method}")

    from dataclasses import replace

    from adaptkit.training import feature_cache

    seen = []
    monkeypatch.setattr(feature_cache, "cache_start", lambda *a, f=feature_cache.cache_start: seen.append(f(*a)) or
                        seen[-1])
    fresh = create_backbone(case.name, pretrained=False)  # no other task's trainable tensors in its patch embedding
    train(f"folder:{cifar_mini}", task="cached", backbone=fresh, method="adapter", method_config={"blocks": 1},
          config=replace(config, augment="none"), registry=reg, classes="0-1")
    assert seen == [len(fresh.model.blocks) - 1], f"{case.key}: the frozen blocks were not cached"


def test_onnx_graph_equals_adaptkit(fam, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from adaptkit.interop.onnx import export_onnx, export_onnx_registry

    case, _, reg, tasks, x = fam
    if case.key not in ONNX_QUICK and not os.environ.get("ADAPTKIT_FULL_MATRIX"):
        pytest.skip("10-40 s a graph: the other cases run with ADAPTKIT_FULL_MATRIX=1 (docs/gen_backbones.py)")
    predictor = Predictor(reg, device="cpu")
    method = "vpt" if "vpt" in tasks else "lora"  # one task per family: the one that changes the sequence most
    path = export_onnx(reg, method, tmp_path / f"{method}.onnx")
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), predictor.logits(x, method), atol=1e-4, rtol=1e-4,
                               msg=f"{case.key}/{method}")
    if case.key not in ("eva02", "beit"):
        return  # several tasks in one graph: once per class besides VisionTransformer (tests/test_interop_onnx.py)
    refs = ["lora", method]
    path = export_onnx_registry(reg, tmp_path / "all.onnx", refs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    index = torch.arange(len(x)) % len(refs)
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {names[0]: x.numpy(), names[1]: index.numpy()})[0]
    want = predictor.logits_mixed(x, [refs[i] for i in index])
    for b in range(len(x)):
        torch.testing.assert_close(torch.from_numpy(got[b, :3]), want[b], atol=1e-4, rtol=1e-4, msg=case.key)


def test_peft_export_and_import_equal_adaptkit(fam, tmp_path):
    peft = pytest.importorskip("peft")
    from adaptkit.interop.peft import export_peft, import_peft

    case, backbone, reg, _, x = fam
    predictor = Predictor(reg, device="cpu")
    if family_of(backbone.model).other_head:  # timm's classifier is not one head on the pooled features
        with pytest.raises(ConfigError, match="not the backbone plus one head"):
            export_peft(reg, "lora", tmp_path / "refused")
        return
    held = outside_bias(backbone.model, "blocks.0.attn.qkv")
    if held:  # the attention reads qkv.weight around PEFT's layer: refused, in one line
        with pytest.raises(ConfigError, match="PEFT cannot express it"):
            export_peft(reg, "lora", tmp_path / "refused")
    torch.manual_seed(2)
    targets = "proj,fc2" if held else "qkv,proj,fc1"
    task = get_method("lora", {"targets": targets, "rank": 2}).attach(backbone.model, 3)
    with torch.no_grad():
        for p in task.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reg.add_version(task_meta(backbone, "peftable", task, ["a", "b", "c"]), task.state())
    task.detach_from_trunk()
    folder = export_peft(reg, "peftable", tmp_path / "peft")
    base = timm.create_model(case.name, num_classes=3)
    base.load_state_dict(plain_copy(backbone.model).state_dict(), strict=False)
    model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    want = predictor.logits(x, "peftable")
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, **TOL, msg=case.key)
    row = import_peft(reg, folder, task="imported", backbone=backbone)
    torch.testing.assert_close(predictor.logits(x, row.ref), want, **TOL, msg=case.key)


def test_every_family_has_a_case():
    """Adding a family is one entry in adaptkit.families plus its case here."""
    from adaptkit.families import FAMILIES

    covered = {family_of(timm.create_model(c.name)).name for c in CASES}
    assert covered == {f.name for f in FAMILIES}

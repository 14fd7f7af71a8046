"""Correctness on the device, asserted for every method, on the packaged backbone (its real weights, 32x32 images):

- the backbone built from the weights file in ``adaptkit/weights/`` on the device has the fingerprint computed on the
  CPU in this run (and the one committed), and gives the CPU's features;
- a mixed batch of every method gives each sample its own task's logits, as a batch of that task alone;
- merged LoRA, SSF and BitFit give the unmerged task's logits;
- routed prediction picks the task the CPU picks and gives that task's prediction, as if it were named;
- each task exported to ONNX (onnxruntime, the CUDA provider where it has one) gives adaptkit's logits;
- each task trained a few steps on the device (the training loop's own step), saved to a registry and loaded back
  gives the logits it had in memory.

Tolerances are relative (max |a - b| / max |b|): on CUDA adaptkit runs under bf16 autocast, on the CPU in float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from common import randomize, task_meta

from adaptkit.backbone import create_backbone, fingerprint
from adaptkit.inference import Predictor
from adaptkit.methods import get_method, merge_lora, merge_ssf, unwrap
from adaptkit.models import PACKAGED_BACKBONE, PACKAGED_FINGERPRINT, WEIGHTS_DIR
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig
from adaptkit.training.loop import make_optimizer, train_step

ARCH = PACKAGED_BACKBONE.split(".")[0]
WEIGHTS = WEIGHTS_DIR / f"{PACKAGED_BACKBONE}.safetensors"
METHODS: dict[str, tuple[str, dict]] = {"adapter": ("adapter", {"rank": 16}), "lora": ("lora", {"rank": 8}),
                                        "ssf": ("ssf", {}), "bitfit": ("bitfit", {}), "vpt": ("vpt", {"tokens": 5}),
                                        "linear": ("linear", {}), "full": ("full", {})}
MERGES = {"lora": merge_lora, "ssf": merge_ssf, "bitfit": merge_ssf}

if TYPE_CHECKING:
    from run import Context


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def tolerances(cuda: bool) -> dict[str, tuple[float, str]]:
    """``same``: two adaptkit computations in the device's precision; ``fp32``: one against a float32 reference."""
    if cuda:
        return {"same": (3e-2, "bf16 autocast"), "fp32": (5e-2, "bf16 vs fp32"),
                "backbone": (5e-3, "fp32, TF32 convolution")}
    return {"same": (1e-4, "fp32"), "fp32": (1e-3, "fp32 vs fp32"), "backbone": (1e-6, "fp32")}


class Checker:
    def __init__(self, ctx: Context) -> None:
        self.sink, self.tol = ctx.sink, tolerances(ctx.cuda)

    def close(self, name: str, subject: str, a: torch.Tensor, b: torch.Tensor, kind: str = "same") -> None:
        limit, what = self.tol[kind]
        diff = rel_diff(a, b)
        self.sink.check(name, subject, f"rel <= {limit:.0e} ({what})", f"{diff:.1e}", diff <= limit)


def check_backbone(ctx: Context, check: Checker) -> None:
    cpu = create_backbone(ARCH, weights=WEIGHTS, device="cpu")
    ctx.sink.check("packaged weights on the CPU", PACKAGED_BACKBONE, "= committed fingerprint", cpu.fingerprint[:12],
                   cpu.fingerprint == PACKAGED_FINGERPRINT)
    dev = create_backbone(ARCH, weights=WEIGHTS, device=ctx.device)
    on_device = fingerprint(dev.model)  # the tensors as they sit on the device, copied back
    ctx.sink.check("fingerprint on the device", PACKAGED_BACKBONE, "= CPU fingerprint", on_device[:12],
                   on_device == cpu.fingerprint)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        check.close("features on the device = CPU", "bare backbone, fp32", dev.model(x.to(ctx.device)),
                    cpu.model(x), "backbone")


def register_every_method(reg: Registry, x: torch.Tensor) -> list[str]:
    """One task per method, random non-zero weights, routing statistics near the features of image i of ``x``."""
    from bench_routing import register_routed

    backbone = create_backbone(ARCH, weights=WEIGHTS)
    refs = list(METHODS)
    register_routed(reg, backbone, refs, 10, 0, x[:len(refs)], methods=list(METHODS.values()))
    return refs


def check_serving_paths(ctx: Context, check: Checker, reg: Registry, refs: list[str], x: torch.Tensor) -> None:
    predictor = Predictor(reg, device=ctx.device)
    xd = x.to(ctx.device)
    mixed_refs = [refs[i % len(refs)] for i in range(len(x))]
    mixed = predictor.logits_mixed(xd, mixed_refs)
    for ref in refs:
        idx = [i for i, r in enumerate(mixed_refs) if r == ref]
        alone = torch.cat([predictor.logits(xd[i:i + 1], ref) for i in idx])
        check.close("mixed batch = alone", ref, torch.stack([mixed[i] for i in idx]), alone)
    for ref, merge in MERGES.items():
        merged = merge(predictor.load(ref).model)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.cuda):
            check.close("merged = unmerged", ref, merged(xd).float(), predictor.logits(xd, ref))
    x, xd = x[:len(refs)], xd[:len(refs)]  # image i sits near task i's classes
    routed = predictor.predict_auto(list(xd), topk=3, accept_all=True)
    on_cpu = Predictor(reg, device="cpu").route(list(x), accept_all=True)
    same = sum(r.task == c.task.ref for r, c in zip(routed, on_cpu, strict=True))
    ctx.sink.check("route on the device = on the CPU", f"{len(x)} images, {len(refs)} tasks", "every image",
                   f"{same}/{len(x)}", same == len(x))
    for ref in refs:
        idx = [i for i, r in enumerate(routed) if r.task.split("@")[0] == ref]
        if not idx:
            ctx.sink.check("routed = task given", ref, "an image routed here", "none", False)
            continue
        given = predictor.predict([xd[i] for i in idx], ref, 3)
        check.close("routed = task given", f"{ref} (top-3 probabilities)",
                    torch.tensor([[p.prob for p in routed[i].predictions] for i in idx]),
                    torch.tensor([[p.prob for p in g] for g in given]))
        same_labels = all([p.label for p in routed[i].predictions] == [p.label for p in g]
                          for i, g in zip(idx, given, strict=True))
        ctx.sink.check("routed = task given", f"{ref} (top-3 labels)", "equal", str(same_labels), same_labels)


def check_onnx(ctx: Context, check: Checker, reg: Registry, refs: list[str], x: torch.Tensor) -> None:
    """Each task exported alone (a tiny run: the adapter only, the path every task's export takes; each export takes
    seconds, and tests/test_interop_onnx.py compares every method's graph) and run by onnxruntime on the CUDA provider
    where it has one, else the CPU's."""
    import onnxruntime as ort

    from adaptkit.interop.onnx import export_onnx

    providers = ["CPUExecutionProvider"]
    if ctx.cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    predictor = Predictor(reg, device=ctx.device)
    for ref in refs[:1] if ctx.tiny else refs:
        session = ort.InferenceSession(str(export_onnx(reg, ref, ctx.work / f"{ref}.onnx", overwrite=True)),
                                       providers=providers)
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        check.close("ONNX = adaptkit", f"{ref} ({session.get_providers()[0]})", predictor.logits(x.to(ctx.device),
                                                                                               ref), got, "fp32")


def check_trained(ctx: Context, check: Checker, x: torch.Tensor) -> None:
    """Each method trained three steps on the device, saved, loaded by a predictor: the same logits."""
    device = torch.device(ctx.device)
    backbone = create_backbone(ARCH, weights=WEIGHTS, device=device)
    reg = Registry(ctx.registry_path("trained"))
    xd, y = x.to(device), torch.arange(len(x), device=device) % 10
    criterion = torch.nn.CrossEntropyLoss()
    for ref, (method, config) in METHODS.items():
        torch.manual_seed(0)
        model = get_method(method, config).attach(backbone.model, 10)
        randomize(model)
        cfg = TrainConfig().resolved(method)
        optimizer, params = make_optimizer(model, cfg), list(model.trainable_parameters())
        model.train()
        for _ in range(3):
            train_step(model, xd, y, optimizer, criterion, params, cfg, device)
        model.eval()
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.cuda):
            before = model(xd).float()
        reg.add_version(task_meta(backbone, ref, model, 10), model.state())
        model.detach_from_trunk()
        unwrap(backbone.model)
        loaded = Predictor(reg, device=ctx.device).logits(xd, ref)
        check.close("trained, saved, loaded = in memory", ref, loaded, before)


def run(ctx: Context) -> None:
    check = Checker(ctx)
    check_backbone(ctx, check)
    reg = Registry(ctx.registry_path("correctness"))
    x = torch.randn(2 * len(METHODS), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    refs = register_every_method(reg, x)
    check_serving_paths(ctx, check, reg, refs, x)
    check_onnx(ctx, check, reg, refs, x)
    check_trained(ctx, check, x)

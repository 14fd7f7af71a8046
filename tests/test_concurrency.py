"""One Predictor shared by many threads with no lock of the caller's: concurrent predictions of different tasks,
mixed batches and routed batches give the answers each gives alone, while tasks load and unload under them."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from adaptkit.backbone import create_backbone
from adaptkit.inference import Predictor
from adaptkit.inference.gate import Gate
from adaptkit.registry import Registry
from tests.conftest import PICO
from tests.test_serve_cache import NAMES, random_images, register_random, same


@pytest.fixture(scope="module")
def reg(tmp_path_factory) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("threads") / "registry.db")
    backbone = create_backbone(PICO, pretrained=False)
    for i, name in enumerate(NAMES):
        register_random(reg, backbone, name, seed=10 + i)
    return reg


def _run_together(jobs: dict[str, callable], rounds: int) -> dict[str, list]:
    results: dict[str, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(key: str, fn) -> None:
        try:
            start.wait()
            results[key] = [fn() for _ in range(rounds)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    return results


def test_concurrent_predictions_of_different_tasks_equal_one_at_a_time(reg):
    imgs = random_images(5, seed=3)
    mix = [NAMES[i % len(NAMES)] for i in range(len(imgs))]
    alone = Predictor(reg, device="cpu")
    want = {n: alone.predict(imgs, n, topk=3) for n in NAMES}
    want_mixed = alone.predict_mixed(imgs, mix, topk=3)
    want_auto = alone.predict_auto(imgs, topk=3)
    assert len({tuple(p[0].label for p in v) for v in want.values()}) == len(NAMES)  # the tasks answer differently

    shared = Predictor(reg, device="cpu")  # nothing loaded yet: the threads load their tasks while others predict
    jobs = {n: (lambda n=n: shared.predict(imgs, n, topk=3)) for n in NAMES}
    jobs["mixed"] = lambda: shared.predict_mixed(imgs, mix, topk=3)
    jobs["auto"] = lambda: shared.predict_auto(imgs, topk=3)
    jobs["default"] = lambda: shared.logits(shared.preprocess(imgs, shared.load(NAMES[0])), NAMES[0])
    results = _run_together(jobs, rounds=6)

    for n in NAMES:
        for got in results[n]:
            assert all(same(a, b) for a, b in zip(got, want[n], strict=True)), n
    for got in results["mixed"]:
        assert all(same(a, b) for a, b in zip(got, want_mixed, strict=True))
    for got in results["auto"]:
        assert [r.task for r in got] == [r.task for r in want_auto]
        assert all(same(a.predictions, b.predictions) for a, b in zip(got, want_auto, strict=True))
    first = alone.logits(alone.preprocess(imgs, alone.load(NAMES[0])), NAMES[0])
    assert all(torch.allclose(got, first, atol=1e-5) for got in results["default"])


def test_loads_and_unloads_under_running_predictions_change_no_answer(reg):
    imgs = random_images(3, seed=4)
    alone = Predictor(reg, device="cpu")
    want = {n: alone.predict(imgs, n, topk=2) for n in NAMES}
    shared = Predictor(reg, device="cpu")
    for n in NAMES[:2]:
        shared.load(n)

    def churn() -> None:  # attach and detach the other tasks' modules on the same backbone, again and again
        for n in NAMES[2:]:
            shared.load(n)
            shared.unload(n)

    jobs = {n: (lambda n=n: shared.predict(imgs, n, topk=2)) for n in NAMES[:2]}
    jobs["churn"] = churn
    results = _run_together(jobs, rounds=8)
    for n in NAMES[:2]:
        for got in results[n]:
            assert all(same(a, b) for a, b in zip(got, want[n], strict=True)), n


def test_unloading_a_task_waits_for_the_forward_pass_that_uses_it(reg):
    """Without the gate the unload lands mid-pass: the last block runs without the adapter and the answer changes."""
    imgs = random_images(4, seed=5)
    shared = Predictor(reg, device="cpu")
    want = shared.predict(imgs, "alpha", topk=3)
    task = shared.load("alpha")
    inside = threading.Event()

    def slow(module, inputs) -> None:  # the pass pauses before the last block, holding no lock of ours
        inside.set()
        time.sleep(0.3)

    hook = task.model.trunk.blocks[-1].register_forward_pre_hook(slow)
    got: list = []
    try:
        worker = threading.Thread(target=lambda: got.append(shared.predict(imgs, "alpha", topk=3)))
        worker.start()
        assert inside.wait(30)
        shared.unload("alpha")  # waits for the pass to leave
        worker.join(60)
    finally:
        hook.remove()
    assert got and all(same(g, w) for g, w in zip(got[0], want, strict=True))
    assert "alpha" not in shared._refs  # and then it is gone
    assert all(same(g, w) for g, w in zip(shared.predict(imgs, "alpha", topk=3), want, strict=True))  # loads again


def test_a_task_unloaded_between_resolving_it_and_its_pass_is_loaded_again(reg):
    """The unload of another thread can land after a call found its task and before the pass: the pass must not run
    the task's head over a backbone without its adapter."""
    imgs = random_images(3, seed=6)
    shared = Predictor(reg, device="cpu")
    x = shared.preprocess(imgs, shared.load("beta"))
    want = shared.logits(x, "beta")
    find, raced = shared._task, []

    def find_then_lose(ref):
        task = find(ref)
        if not raced:
            raced.append(ref)
            shared.unload(ref)  # as if another thread unloaded it right here
        return task

    shared._task = find_then_lose
    got = shared.logits(x, "beta")
    assert raced == ["beta"] and torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(shared.logits_mixed(x, ["beta"] * 3)[0], want[0], atol=1e-6)


def test_the_gate_lets_readers_in_together_and_a_writer_alone():
    gate = Gate()
    inside, most, order = [0], [0], []
    lock = threading.Lock()
    both_in = threading.Barrier(2, timeout=10)

    def reader() -> None:
        with gate.reading():
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            both_in.wait()  # two readers inside at once, or this times out
            with gate.reading():  # a read inside a read does not wait
                pass
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert most[0] == 2

    with gate.writing():
        with gate.writing():  # a load inside a load
            with gate.reading():  # and a read while writing
                order.append("nested")
        t = threading.Thread(target=lambda: (gate.reading().__enter__(), order.append("reader")))
        t.start()
        t.join(0.3)
        assert t.is_alive() and order == ["nested"]  # the reader waits for the writer
    t.join(10)
    assert order == ["nested", "reader"]
    with gate.reading(), pytest.raises(RuntimeError, match="load it first"):
        with gate.writing():
            pass


def test_threads_assigning_their_own_active_task_never_see_each_others():
    """``ctx.active = slot`` is the calling thread's alone, even when threads assign in lock step on one context; an
    assignment inside a mixed choice keeps the mix, and the previous choice comes back after ``using``."""
    from adaptkit.methods.sites import TaskContext

    ctx = TaskContext()
    slots = [ctx.new_slot() for _ in range(4)]
    step = threading.Barrier(len(slots), timeout=20)
    seen: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            got = []
            for r in range(50):
                ctx.active = slots[(i + r) % len(slots)]  # every thread assigns, then every thread reads
                step.wait()
                got.append(ctx.active)
                step.wait()
            seen[i] = got
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(slots))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i, got in seen.items():
        assert got == [slots[(i + r) % len(slots)] for r in range(50)], i
    assert ctx.active is None  # this thread assigned nothing

    order = torch.tensor([1, 0, 1])
    with ctx.using(slot_order=tuple(slots[:2]), sample_slots=order):
        ctx.active = slots[3]
        assert ctx.active == slots[3] and ctx.slot_order == tuple(slots[:2]) and ctx.sample_slots is order
        with ctx.using(active=slots[2]):
            assert ctx.active == slots[2] and ctx.sample_slots is None and ctx.slot_order == ()
        assert ctx.sample_slots is order
    assert ctx.active is None and ctx.sample_slots is None


def test_checkpointed_backward_in_another_thread_gives_the_same_gradients():
    """As on CUDA, where the autograd engine runs the backward pass in its own thread: with activation checkpointing
    the blocks are recomputed there, and must apply the task that the forward pass applied (before the fix, the
    recomputed blocks ran without the adapter and torch.utils.checkpoint refused the backward pass)."""
    from adaptkit.methods import get_method
    from adaptkit.training.checkpointing import activation_checkpointing

    torch.manual_seed(0)
    task = get_method("adapter", {"rank": 4}).attach(create_backbone(PICO, pretrained=False).model, 3)
    for p in task.trainable_parameters():
        torch.nn.init.normal_(p, std=0.1)
    task.train()
    x = torch.randn(2, 3, 32, 32)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        task.zero_grad(set_to_none=True)
        with activation_checkpointing(task.trunk, checkpointing):
            loss = task(x).pow(2).sum()
            errors: list[BaseException] = []

            def backward() -> None:
                try:
                    loss.backward()
                except BaseException as exc:  # noqa: BLE001 - raised below, in the test's thread
                    errors.append(exc)

            worker = threading.Thread(target=backward)
            worker.start()
            worker.join(60)
            if errors:
                raise errors[0]
        return [p.grad.clone() for p in task.trainable_parameters()]

    want = grads(False)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(grads(True), want, strict=True))

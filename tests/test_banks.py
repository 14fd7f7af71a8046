"""Sites' banks: each task's tensors written once into a row, reused by every mixed batch, and kept right when tasks
come and go, ranks differ, or a task's tensors change."""

from __future__ import annotations

import torch

from adaptkit.methods import get_method
from adaptkit.methods.sites import TaskSite

CASES = [("adapter", {"rank": 4}), ("adapter", {"rank": 16, "placement": "sequential"}),
         ("adapter", {"rank": 8, "act": "relu"}), ("lora", {"rank": 2}), ("lora", {"rank": 8}), ("ssf", {}),
         ("vpt", {"tokens": 3}), ("linear", {})]


def attach(trunk, method: str, config: dict, seed: int):
    torch.manual_seed(seed)
    task = get_method(method, config).attach(trunk, num_classes=3)
    for p in task.trainable_parameters():
        torch.nn.init.normal_(p, std=0.1)
    return task.eval()


def mixed(tasks, x: torch.Tensor, owner: list[int]) -> torch.Tensor:
    ctx = tasks[0].ctx
    with torch.inference_mode(), ctx.using(slot_order=tuple(t.slot for t in tasks), sample_slots=torch.tensor(owner)):
        return tasks[0].trunk(x)


def alone(task, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), task.ctx.using(active=task.slot):
        return task.trunk(x)


def sites(trunk) -> list[TaskSite]:
    return [m for m in trunk.modules() if isinstance(m, TaskSite)]


def test_rows_are_written_once_and_reused_by_later_batches(pico):
    tasks = [attach(pico.model, m, c, i) for i, (m, c) in enumerate(CASES[:5])]
    x = torch.randn(5, 3, 32, 32)
    first = mixed(tasks, x, [0, 1, 2, 3, 4])
    banks = {id(s): {k: t.data_ptr() for k, t in s._bank.items()} for s in sites(pico.model)}
    assert any(banks.values())
    writes = []
    for s in sites(pico.model):
        s._write = lambda row, values, s=s: writes.append(row)  # any write now fails the check below
    again = mixed(list(reversed(tasks)), x.flip(0), [0, 1, 2, 3, 4])  # another order, other slots per sample
    torch.testing.assert_close(again.flip(0), first)
    assert writes == []
    assert banks == {id(s): {k: t.data_ptr() for k, t in s._bank.items()} for s in sites(pico.model)}


def test_rows_of_removed_tasks_go_to_new_ones_and_answers_stay_right(pico):
    """Tasks removed and attached in turn reuse rows (the bank does not grow with churn); a new task in an old row
    never sees the old task's tensors, a task of another method there neither, and a slot with modules at no site
    (the linear probe) applies none."""
    x = torch.randn(4, 3, 32, 32)
    live = [attach(pico.model, *CASES[i % len(CASES)], seed=i) for i in range(4)]
    seed = 4
    for step in range(12):
        owner = [step % 4, (step + 1) % 4, (step + 2) % 4, (step + 3) % 4]
        got = mixed(live, x, owner)
        for b, i in enumerate(owner):
            torch.testing.assert_close(got[b], alone(live[i], x[b:b + 1])[0], atol=1e-5, rtol=1e-5,
                                       msg=f"step {step}, sample {b}: {live[i].method.name}")
        gone = live.pop(step % 4)
        gone.detach_from_trunk()
        live.insert(step % 4, attach(pico.model, *CASES[seed % len(CASES)], seed=seed))
        seed += 1
    rows = {t.ctx.row(t.slot) for t in live} - {None}
    assert max(rows) <= 4 and max(s._bank[next(iter(s._bank))].shape[0] for s in sites(pico.model)
                                  if s._bank) <= 8


def test_a_wider_rank_grows_the_bank_and_keeps_the_rows_already_there(pico):
    small = attach(pico.model, "adapter", {"rank": 2}, 0)
    x = torch.randn(2, 3, 32, 32)
    before = mixed([small], x, [0, 0])
    wide = attach(pico.model, "adapter", {"rank": 32}, 1)
    both = mixed([small, wide], x, [0, 1])
    torch.testing.assert_close(both[0], before[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], alone(wide, x[1:])[0], atol=1e-5, rtol=1e-5)
    assert all(s._bank["down"].shape[-1] == 32 for s in sites(pico.model))
    torch.testing.assert_close(mixed([small], x, [0, 0]), before, atol=1e-5, rtol=1e-5)  # the narrow batch too


def test_a_change_in_place_or_new_tensors_are_seen_by_the_next_batch(pico):
    task = attach(pico.model, "lora", {"rank": 4}, 0)
    other = attach(pico.model, "adapter", {"rank": 4}, 1)
    x = torch.randn(2, 3, 32, 32)
    mixed([task, other], x, [0, 1])
    with torch.no_grad():  # an optimiser step does this
        for p in task.trainable_parameters():
            p.add_(0.05)
    torch.testing.assert_close(mixed([task, other], x, [0, 1])[0], alone(task, x[:1])[0], atol=1e-5, rtol=1e-5)
    state = {k: torch.randn_like(v) for k, v in task.state().items()}
    task.load_state(state, assign=True)  # new tensor objects
    torch.testing.assert_close(mixed([task, other], x, [0, 1])[0], alone(task, x[:1])[0], atol=1e-5, rtol=1e-5)


def test_a_bank_written_in_inference_mode_is_cleared_outside_it(pico):
    task, other = attach(pico.model, "adapter", {"rank": 4}, 0), attach(pico.model, "adapter", {"rank": 4}, 1)
    mixed([task, other], torch.randn(2, 3, 32, 32), [0, 1])  # written inside inference mode
    row = task.ctx.row(task.slot)
    task.detach_from_trunk()  # outside it: the row is zeroed, not refused
    banks = [s._bank["down"] for s in sites(pico.model)]
    assert banks and all(not b[row].any() for b in banks)
    assert all(b[other.ctx.row(other.slot)].any() for b in banks)

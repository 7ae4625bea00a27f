"""Post-local SGD: the schedule by hand, and two real gloo ranks stepping alone, averaging, skipping alone."""

from datetime import timedelta

import pytest
import torch
from torch import nn

from pipelines.training.local_sgd import LocalSGD, average_tensors, averaged_tensors, optimizer_tensors
from pipelines.training.step import StepRunner
from tests.support.one_weight import OneWeight


def test_the_schedule_keeps_the_warm_up_in_sync_then_averages_every_k_steps():
    s = LocalSGD(every=4, start=2)
    assert [s.local(step) for step in range(5)] == [False, False, True, True, True]
    assert [done for done in range(15) if s.due(done)] == [6, 10, 14]
    off = LocalSGD(every=0, start=2)
    assert not off.enabled and not any(off.local(i) or off.due(i) for i in range(20))


def test_sync_averages_once_per_step_count_and_not_before_a_local_step_ran():
    s = LocalSGD(every=4, start=2)
    model = nn.Linear(2, 2)
    assert not s.sync(model, 2)  # no local step yet: the weights are equal
    assert s.sync(model, 3) and s.averaged_at == 3
    assert not s.sync(model, 3)  # already averaged at this count
    assert not LocalSGD(every=0, start=0).sync(model, 5)


def test_a_checkpoint_sync_after_the_weights_were_averaged_at_that_step_averages_the_optimizer_state_only(
        monkeypatch):
    import pipelines.training.local_sgd as local_sgd

    averaged: list[list[torch.Tensor]] = []
    monkeypatch.setattr(local_sgd, "average_tensors", averaged.append)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    s = LocalSGD(every=4, start=2)
    assert s.sync(model, 3)  # the validation's: the weights
    assert s.sync(model, 3, opt)  # the checkpoint's, at the same count: the momenta alone
    assert s.sync(model, 4, opt)  # a later checkpoint: both
    ids = [{id(t) for t in call} for call in averaged]
    weights, momenta = {id(p) for p in model.parameters()}, {id(t) for t in optimizer_tensors(opt)}
    assert ids == [weights, momenta, weights | momenta] and len(momenta) == 2


def test_averaged_tensors_are_the_parameters_and_the_batchnorm_statistics():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    got = {id(t) for t in averaged_tensors(model)}
    bn = model[1]
    assert got == {id(t) for t in [*model.parameters(), bn.running_mean, bn.running_var]}


def _on_rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    # the steps: rank r's input is r + 1; SGD at a constant lr 0.01
    model = nn.parallel.DistributedDataParallel(OneWeight())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    local_sgd = LocalSGD(every=3, start=1)
    runner = StepRunner(model=model, optimizer=opt, scheduler=sched, device=torch.device("cpu"), grad_clip=0.0,
                        flip=False, rank=rank, local_sgd=local_sgd)
    after, finite = [], []
    for step in range(5):
        nan_here = rank == 1 and step == 4  # rank 1 alone: a local step skips alone, with no collective to pair
        finite.append(runner({"x": torch.tensor([float("nan") if nan_here else rank + 1.0])}, step).finite)
        local_sgd.after_step(model, step + 1)
        after.append(float(model.module.w))
    local_sgd.sync(model, 5)
    final = float(model.module.w)

    # averaging keeps each tensor's storage and memory format (channels_last), BatchNorm statistics and the
    # optimizer's momentum included
    torch.manual_seed(rank)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    conv(torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)).square().sum().backward()
    opt.step()

    def tensors():
        return averaged_tensors(conv) + optimizer_tensors(opt)

    before = [t.detach().clone() for t in tensors()]
    pointers = [t.data_ptr() for t in tensors()]
    average_tensors(tensors())  # the weights (BatchNorm statistics too) and the momenta, as before a checkpoint
    torch.save({"after": after, "finite": finite, "final": final, "before": before,
                "averaged": [t.detach().clone() for t in tensors()], "momenta": len(optimizer_tensors(opt)),
                "same_storage": pointers == [t.data_ptr() for t in tensors()],
                "channels_last": conv[0].weight.is_contiguous(memory_format=torch.channels_last)},
               f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_step_alone_after_the_warm_up_and_average_on_schedule(tmp_path):
    """By hand: step 0 is DDP's (mean gradient 15 * 1.5: w 0.775 on both); steps 1-4 are local (rank 0 moves
    by 0.15 a step, rank 1 by 0.30) with the average after 4 steps (0.325 and -0.125: 0.1); step 4's NaN on
    rank 1 skips its step alone while rank 0 steps to -0.05; the final sync averages -0.05 and 0.1."""
    import torch.multiprocessing as mp

    mp.spawn(_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2))
    assert r0["after"] == pytest.approx([0.775, 0.625, 0.475, 0.1, -0.05])
    assert r1["after"] == pytest.approx([0.775, 0.475, 0.175, 0.1, 0.1])
    assert r0["finite"] == [True] * 5 and r1["finite"] == [True] * 4 + [False]
    assert r0["final"] == r1["final"] == pytest.approx(0.025)
    for a, b, m0, m1 in zip(r0["before"], r1["before"], r0["averaged"], r1["averaged"], strict=True):
        assert torch.allclose(m0, (a + b) / 2) and torch.equal(m0, m1)
    assert not torch.equal(r0["before"][0], r1["before"][0])  # the ranks did start apart
    assert not torch.equal(r0["before"][-1], r1["before"][-1])  # and their momenta
    assert r0["momenta"] == 4  # conv and BatchNorm weight and bias
    assert r0["same_storage"] and r1["same_storage"] and r0["channels_last"] and r1["channels_last"]

"""The step runner's bookkeeping, by hand on a one-weight model: the non-finite counters over mixed sequences,
the schedule over skipped steps, what a skipped step reports, the gradient clip (plain torch, no Ray)."""

import math

import pytest
import torch

from pipelines.training.step import NonFiniteLossError, StepRunner, finite_flag_on_every_rank
from tests.support.one_weight import OneWeight

LR = 0.1
GOOD, BAD = 1.0, float("nan")
# a first step skipped steps the schedule before any optimizer step, as intended: torch warns about that order
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")


def _runner(*, max_nonfinite_in_a_row: int = 3, grad_clip: float = 0.0):
    model = OneWeight()  # loss terms w * x * 1..5: total 15 w x, d total / dw = 15 x
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))  # lr 0.1 / (1 + scheduler steps)
    return StepRunner(model=model, optimizer=opt, scheduler=sched, device=torch.device("cpu"), grad_clip=grad_clip,
                      flip=False, max_nonfinite_in_a_row=max_nonfinite_in_a_row)


def _run(runner, xs):
    return [runner({"x": torch.tensor([x])}, step) for step, x in enumerate(xs)]


def test_the_in_a_row_counter_resets_on_a_good_step():
    runner = _runner(max_nonfinite_in_a_row=3)
    # bad, good, bad, bad: never three in a row, four bad in all
    results = _run(runner, [BAD, GOOD, BAD, BAD, GOOD, BAD])
    assert [r.finite for r in results] == [False, True, False, False, True, False]
    assert runner.nonfinite_in_a_row == 1 and runner.nonfinite_total == 4
    # two more bad ones make three in a row: stop, naming the count
    runner({"x": torch.tensor([BAD])}, 6)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row .*; lower train.lr or check the data$"):
        runner({"x": torch.tensor([BAD])}, 7)
    assert runner.nonfinite_total == 6


def test_max_nonfinite_in_a_row_is_the_limit_exactly():
    runner = _runner(max_nonfinite_in_a_row=2)
    _run(runner, [BAD])
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        runner({"x": torch.tensor([BAD])}, 1)


def test_skipped_steps_advance_the_schedule_and_leave_the_weight():
    runner = _runner(max_nonfinite_in_a_row=10)
    results = _run(runner, [GOOD, BAD, BAD, GOOD])
    # every step, skipped or not, runs at the lr of its step number and moves the schedule on by one
    assert [r.lr for r in results] == pytest.approx([LR / 1, LR / 2, LR / 3, LR / 4])
    assert runner.scheduler.last_epoch == 4
    # only the good steps update w: w -= lr * 15 * x at lr 0.1 and then 0.025
    assert runner.model.w.item() == pytest.approx(1.0 - 0.1 * 15 - 0.025 * 15)
    # a skipped step reports its (non-finite) terms and a NaN total; a good one the sum of its terms
    assert math.isnan(results[1].total) and all(math.isnan(v) for v in results[1].losses.values())
    assert results[0].total == pytest.approx(15.0) and results[0].losses["loss_mask"] == pytest.approx(5.0)
    assert results[3].total == pytest.approx(15.0 * (1.0 - 1.5))


def test_grad_clip_reaches_the_step():
    clipped = _runner(grad_clip=1.0)
    _run(clipped, [GOOD])  # gradient 15 clipped to norm 1
    assert clipped.model.w.item() == pytest.approx(1.0 - LR * 1.0)
    plain = _runner(grad_clip=0.0)
    _run(plain, [GOOD])
    assert plain.model.w.item() == pytest.approx(1.0 - LR * 15.0)


def test_finite_flag_without_a_process_group():
    assert finite_flag_on_every_rank(torch.tensor(2.0)).tolist() == [1]
    assert finite_flag_on_every_rank(torch.tensor(float("inf"))).tolist() == [0]
    assert finite_flag_on_every_rank(torch.tensor(float("nan")), collective=False).tolist() == [0]


def test_flip_without_a_flip_permutation_is_refused_with_the_way_out():
    runner = StepRunner(model=OneWeight(), optimizer=None, scheduler=None, device=torch.device("cpu"), grad_clip=0.0,
                        flip=True, flip_perm=None)
    message = ("flip augmentation needs the anchors' flip permutation (model.flip_perm), and this model has none: "
               "its anchors are not mirror-symmetric; train with train.flip=false")
    with pytest.raises(ValueError) as raised:
        runner({"x": torch.tensor([GOOD])}, 0)
    assert str(raised.value) == message

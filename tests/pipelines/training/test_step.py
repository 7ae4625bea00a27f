"""The step runner's bookkeeping, by hand on a one-weight model: the non-finite counters over mixed sequences,
the schedule over skipped steps, what a skipped step reports, the gradient clip (plain torch, no Ray)."""

import math

import pytest
import torch
from torch import nn

from mrcnn.model import LOSS_KEYS
from pipelines.training.local_sgd import LocalSGD
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


class _Recorder(nn.Module):
    """One weight; keeps every batch the step hands it (after densifying and the flip)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.seen = []

    def forward(self, batch):
        self.seen.append(batch)
        return {k: self.w * (i + 1) for i, k in enumerate(LOSS_KEYS)}


def _seeded_choice(seed: int, step: int, rank: int, n: int) -> torch.Tensor:
    # the documented mix: distinct (seed, step, rank) give distinct generator seeds for any realistic run
    return torch.rand(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + rank)) < 0.5


def _flip_runner(model, *, flip: bool, perm, seed: int = 5, rank: int = 1):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    return StepRunner(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                      device=torch.device("cpu"), grad_clip=0.0, flip=flip, flip_perm=perm, seed=seed, rank=rank)


def test_flip_choice_is_a_function_of_seed_step_and_rank():
    runner = _flip_runner(OneWeight(), flip=True, perm=torch.arange(3))
    chosen = runner.flip_choice(4, 64)
    assert torch.equal(chosen, _seeded_choice(5, 4, 1, 64)) and 16 < int(chosen.sum()) < 48
    others = [runner.flip_choice(5, 64), _flip_runner(OneWeight(), flip=True, perm=None, rank=0).flip_choice(4, 64),
              _flip_runner(OneWeight(), flip=True, perm=None, seed=6).flip_choice(4, 64)]
    assert all(not torch.equal(chosen, other) for other in others)


def test_each_step_flips_the_images_flip_choice_picks_and_their_anchor_labels():
    n, width = 8, 3  # n images of one channel: the batch size is not confused with another dimension
    images = torch.arange(n * width, dtype=torch.float32).reshape(n, 1, 1, width)
    match = torch.tensor([[1, 0, -1]]).repeat(n, 1)
    runner = _flip_runner(_Recorder(), flip=True, perm=torch.tensor([2, 1, 0]))
    for step in range(3):
        runner({"images": images, "rpn_match": match}, step)
        which = _seeded_choice(5, step, 1, n)
        assert 0 < int(which.sum()) < n  # the premise: some images flipped, some not
        seen = runner.model.seen[-1]
        assert torch.equal(seen["images"], torch.where(which.view(-1, 1, 1, 1), images.flip(-1), images))
        assert torch.equal(seen["rpn_match"], torch.where(which.view(-1, 1), match.flip(-1), match))
    plain = _flip_runner(_Recorder(), flip=False, perm=torch.tensor([2, 1, 0]))
    plain({"images": images, "rpn_match": match}, 0)
    assert torch.equal(plain.model.seen[-1]["images"], images)


def test_a_given_grad_scaler_scales_unscales_before_the_clip_and_updates():
    # the CPU has no fp16 autocast, so precision 'off' builds no scaler; one handed in is used as it is
    for clip, expected_w in ((1.0, 1.0 - LR * 1.0), (0.0, 1.0 - LR * 15.0)):
        runner = _runner(grad_clip=clip)
        runner.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1)
        _run(runner, [GOOD])
        assert runner.model.w.item() == pytest.approx(expected_w)  # the true gradient 15, clipped or not
        assert scaler.get_scale() == 8.0  # one good step at growth_interval 1 doubles the scale


def test_a_scaler_given_at_construction_is_kept():
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    runner = StepRunner(model=OneWeight(), optimizer=None, scheduler=None, device=torch.device("cpu"), grad_clip=0.0,
                        flip=False, scaler=scaler)
    assert runner.scaler is scaler


def test_local_sgd_steps_of_a_bare_model_step_as_the_plain_ones():
    local = _runner()
    local.local_sgd = LocalSGD(every=2, start=1)  # steps 1 and 2 local: no all-reduce to skip on a bare model
    results = _run(local, [GOOD, GOOD, BAD])
    assert [r.finite for r in results] == [True, True, False]
    assert local.model.w.item() == pytest.approx(1.0 - 0.1 * 15 - 0.05 * 15)  # the gradient 15 x whatever w is

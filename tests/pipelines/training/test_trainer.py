"""The trainer and its hooks without Ray: plain lists of batches, the one-weight model, real checkpoints."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipelines.training.checkpoints import load_checkpoint, restore
from pipelines.training.hooks.averaging import LocalSGDHook
from pipelines.training.hooks.checkpointing import CheckpointHook
from pipelines.training.hooks.validation import ValidationHook
from pipelines.training.local_sgd import LocalSGD, optimizer_tensors
from pipelines.training.step import StepRunner
from pipelines.training.trainer import Hook, Trainer, TrainerState
from tests.support.one_weight import OneWeight

PER_EPOCH = 3


def _epoch(epoch: int, skip: int) -> list[dict[str, torch.Tensor]]:
    """Epoch `epoch`'s batches after the first `skip`: batch i holds x = 10 * epoch + i + 1 (which one ran is
    read back from it)."""
    return [{"x": torch.tensor([10.0 * epoch + i + 1])} for i in range(PER_EPOCH)][skip:]


def _runner(model=None, momentum=0.0, local_sgd=None) -> StepRunner:
    model = model or OneWeight()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))  # its state matters on resume
    return StepRunner(model=model, optimizer=opt, scheduler=sched, device=torch.device("cpu"), grad_clip=0.0,
                      flip=False, local_sgd=local_sgd)


class Recorder(Hook):
    """Writes (name, point, step, epoch, batch_in_epoch, epoch_ended) into a shared list at every point."""

    def __init__(self, name: str, seen: list):
        self.name, self.seen = name, seen

    def _note(self, point: str, trainer: Trainer) -> None:
        s = trainer.state
        self.seen.append((self.name, point, s.step, s.epoch, s.batch_in_epoch, s.epoch_ended))

    def before_step(self, trainer):
        self._note("before_step", trainer)

    def after_step(self, trainer):
        self._note("after_step", trainer)

    def epoch_end(self, trainer):
        self._note("epoch_end", trainer)

    def before_checkpoint(self, trainer):
        self._note("before_checkpoint", trainer)

    def train_end(self, trainer):
        self._note("train_end", trainer)


def test_hooks_run_in_order_at_each_point_with_the_step_counts():
    """7 steps over epochs of 3: two full epochs, then the last step cuts the third short. Each hook runs at each
    point in the order given; before_step sees the 0-based step about to run, after_step the steps done."""
    seen: list = []
    Trainer(_runner(), _epoch, last_step=7, batch_size=1,
            hooks=[Recorder("a", seen), Recorder("b", seen)]).train()
    expected = []
    for step in range(7):
        epoch, batch = divmod(step, PER_EPOCH)
        expected += [(n, "before_step", step, epoch, batch, False) for n in "ab"]
        expected += [(n, "after_step", step + 1, epoch, batch + 1, False) for n in "ab"]
        if (step + 1) % PER_EPOCH == 0:
            expected += [(n, "epoch_end", step + 1, epoch, PER_EPOCH, True) for n in "ab"]
    expected += [(n, "epoch_end", 7, 2, 1, False) for n in "ab"]  # cut short by the last step: not ended
    expected += [(n, "train_end", 7, 2, 1, False) for n in "ab"]
    assert seen == expected


def test_a_resumed_trainer_skips_the_batches_its_epoch_already_ran():
    seen: list = []
    runner = _runner()
    Trainer(runner, _epoch, last_step=5, batch_size=1, hooks=[Recorder("a", seen)],
            state=TrainerState(step=4, epoch=1, batch_in_epoch=1)).train()
    assert [r[1:] for r in seen] == [("before_step", 4, 1, 1, False), ("after_step", 5, 1, 2, False),
                                     ("epoch_end", 5, 1, 2, False), ("train_end", 5, 1, 2, False)]
    # the step ran on epoch 1's second batch (x = 12): w moved by lr * 15 * 12
    assert float(runner.model.w.detach()) == pytest.approx(1 - 0.001 * 15 * 12)


def test_an_epoch_without_a_batch_is_an_error():
    with pytest.raises(RuntimeError, match="an epoch gave this worker no batch of 4"):
        Trainer(_runner(), lambda epoch, skip: [], last_step=3, batch_size=4).train()


class WeightEMA(Hook):
    """What an EMA of the weights takes: a hook, nothing else (here in the test, beside the trainer untouched)."""

    def __init__(self, decay: float):
        self.decay, self.ema = decay, None

    def after_step(self, trainer):
        w = trainer.model.w.detach().clone()
        self.ema = w if self.ema is None else self.decay * self.ema + (1 - self.decay) * w


def test_a_hook_added_without_touching_the_trainer_gets_called():
    ema, weights = WeightEMA(0.5), []

    class Weights(Hook):
        def after_step(self, trainer):
            weights.append(float(trainer.model.w.detach()))

    Trainer(_runner(), _epoch, last_step=4, batch_size=1, hooks=[ema, Weights()]).train()
    expected = weights[0]
    for w in weights[1:]:
        expected = 0.5 * expected + 0.5 * w
    assert len(weights) == 4 and float(ema.ema) == pytest.approx(expected) and expected != pytest.approx(weights[-1])


def _reports(tmp_path):
    """A report sink as Ray Train is in a worker: each report's metrics, and its checkpoint copied to storage
    (`tmp_path/checkpoint_N`) and read back."""
    got = []

    def report(metrics, directory):
        kept = None
        if directory is not None:
            kept = tmp_path / f"checkpoint_{len(list(tmp_path.glob('checkpoint_*')))}"
            shutil.copytree(directory, kept)
        got.append((metrics, kept and load_checkpoint(kept), kept))

    return got, report


def test_checkpoints_every_n_steps_and_at_each_epoch_end_hold_where_a_resume_continues(tmp_path):
    """every=2, epochs of 3, 8 steps: after steps 2, 4, 6 (not 8: the last step's is its epoch end's) and at the
    epoch ends after 3, 6 and 8. An epoch that ran out resumes at the next epoch's start."""
    got, report = _reports(tmp_path)
    hook = CheckpointHook(2, {"num_classes": 4}, rank=0, world=1, report=report)
    Trainer(_runner(), _epoch, last_step=8, batch_size=1, hooks=[hook]).train()
    positions = [(m["step"], m["epoch"], c.batch_in_epoch, "loss" in m, "nonfinite_steps" in m) for m, c, _ in got]
    assert positions == [(2, 0, 2, True, False), (3, 1, 0, False, True), (4, 1, 1, True, False),
                         (6, 1, 3, True, False), (6, 2, 0, False, True), (8, 2, 2, False, True)]
    for metrics, checkpoint, _ in got:
        assert checkpoint.step == metrics["step"] and checkpoint.epoch == metrics["epoch"]
        assert metrics["val_loss"] == float("inf") and checkpoint.meta["num_classes"] == 4
        assert checkpoint.scheduler["last_epoch"] == metrics["step"] and len(checkpoint.rng_by_rank) == 1


def test_a_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(tmp_path):
    """8 steps straight, or 5 (cut mid-epoch) then the rest from the last checkpoint into fresh objects: the same
    batches in the same order, the same weights, momentum and schedule."""

    def run(storage, last_step, runner, state=None):
        got, report = _reports(storage)
        seen: list[float] = []

        def batches(epoch, skip):
            for batch in _epoch(epoch, skip):
                seen.append(float(batch["x"]))
                yield batch

        Trainer(runner, batches, last_step=last_step, batch_size=1, state=state,
                hooks=[CheckpointHook(2, {}, rank=0, world=1, report=report)]).train()
        return got, seen

    straight = _runner(momentum=0.9)
    _, seen_straight = run(tmp_path / "a", 8, straight)
    got, seen_first = run(tmp_path / "b", 5, _runner(momentum=0.9))
    _, last, directory = got[-1]
    assert (last.step, last.epoch, last.batch_in_epoch) == (5, 1, 2)
    resumed = _runner(momentum=0.9)
    step, epoch, batch_in_epoch = restore(str(directory), resumed.model, resumed.optimizer, resumed.scheduler)
    state = TrainerState(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch)
    _, seen_second = run(tmp_path / "c", 8, resumed, state)
    assert seen_first + seen_second == seen_straight == [1, 2, 3, 11, 12, 13, 21, 22]
    assert float(resumed.model.w.detach()) == pytest.approx(float(straight.model.w.detach()), abs=1e-7)
    assert torch.equal(optimizer_tensors(resumed.optimizer)[0], optimizer_tensors(straight.optimizer)[0])
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch == 8


def test_local_sgd_averages_the_weights_before_validation_and_the_optimizer_state_alone_at_the_checkpoint(
        tmp_path, monkeypatch):
    """The hooks in the worker's order at an epoch's end: local SGD's weight average, the validation loss of the
    averaged weights, then the checkpoint, whose sync at the same step averages the momenta only."""
    import pipelines.training.local_sgd as local_sgd

    calls: list = []
    monkeypatch.setattr(local_sgd, "average_tensors", lambda tensors: calls.append({id(t) for t in tensors}))

    class ValidationSeen(Hook):
        def epoch_end(self, trainer):
            calls.append(("validated", trainer.state.val_step))

    schedule = LocalSGD(every=4, start=1)  # no periodic average within 3 steps: the epoch's end's alone
    runner = _runner(momentum=0.9, local_sgd=schedule)
    got, report = _reports(tmp_path)
    hooks = [LocalSGDHook(schedule), ValidationHook(lambda: _epoch(0, 0), device=torch.device("cpu"), every=1),
             ValidationSeen(), CheckpointHook(100, {}, rank=0, world=1, report=report)]
    Trainer(runner, _epoch, last_step=3, batch_size=1, hooks=hooks).train()
    weights, momenta = {id(runner.model.w)}, {id(t) for t in optimizer_tensors(runner.optimizer)}
    assert calls == [weights, ("validated", 3), momenta]
    metrics, checkpoint, _ = got[0]
    assert len(got) == 1 and metrics["val_loss"] == checkpoint.meta["val_loss"] < float("inf")

"""The trainer: the epochs and steps of one worker, and the hooks it calls around them.

After detectron2's engine (`TrainerBase` and its hooks): the trainer owns the loop's state (`TrainerState`:
step, epoch, position in the epoch, last step's result, last validation losses) and runs `run_step` (a
`StepRunner`, pipelines/training/step.py) on each batch. Everything else is a hook, called in the order given:

    for each epoch:
        for each batch:  before_step -> run_step -> after_step
        epoch_end        (also when the last step cut the epoch short)
    train_end

`before_checkpoint` is the fifth point: a hook that is about to save (the checkpoint hook) asks every hook to
make the state what every rank has (local SGD averages there). The hooks of `mrcnn-cli train` are in
pipelines/training/hooks/; a new behaviour (EMA, a periodic evaluation, early stopping, a profiler) is a new
hook there, added to the worker's list (pipelines/training/loop.py), with nothing changed here.

Plain torch: the trainer runs on any iterable of batches, without Ray (tests/pipelines/training/test_trainer.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from pipelines.training.step import StepResult, StepRunner


class Hook:
    """Called by the trainer at each point of the loop; every point does nothing unless a hook overrides it.
    Each gets the trainer: its `state` (read, and written by the hooks that own a field) and its parts."""

    def before_step(self, trainer: Trainer) -> None:
        """Before `run_step` on the batch of step `trainer.state.step` (0-based), after it arrived."""

    def after_step(self, trainer: Trainer) -> None:
        """After the step: `state.step` steps done, `state.result` the step's losses."""

    def epoch_end(self, trainer: Trainer) -> None:
        """After the epoch's batches ran out (`state.epoch_ended`) or the last step cut it short."""

    def before_checkpoint(self, trainer: Trainer) -> None:
        """A checkpoint of the state is about to be written: make it what every rank has."""

    def train_end(self, trainer: Trainer) -> None:
        """After the last step's epoch_end."""


@dataclass
class TrainerState:
    """What the hooks share, on the trainer instead of in locals: where the run is and what it last measured."""

    step: int = 0  # steps done
    epoch: int = 0  # the epoch running (0-based)
    batch_in_epoch: int = 0  # batches of this epoch done (those skipped on a resume included)
    epoch_ended: bool = False  # at epoch_end: the epoch's batches ran out (not cut short by the last step)
    result: StepResult | None = None  # the last step's
    data_wait_s: float = 0.0  # how long the last step's batch was waited for
    val: dict[str, float] = field(default_factory=dict)  # the last validation losses (`val_loss`, `val_loss_*`)
    val_step: int = -1  # the step count `val` was computed at

    def resume_point(self) -> tuple[int, int]:
        """(epoch, batch_in_epoch) where a run resumed from now continues: the next epoch's start once this one's
        batches ran out."""
        return (self.epoch + 1, 0) if self.epoch_ended else (self.epoch, self.batch_in_epoch)


class Trainer:
    """Runs `run_step` over the epochs given by `batches(epoch, skip)` (an epoch's batches, its first `skip`
    left out: those consumed before a resume) until `last_step` steps are done, calling `hooks` in order.

    state: where to start (a restored checkpoint's step, epoch and batch_in_epoch), a fresh run if None.
    batch_size: this worker's batch, for the message when an epoch gives no batch at all."""

    def __init__(self, run_step: StepRunner, batches: Callable[[int, int], Iterable[dict[str, Any]]], *,
                 last_step: int, batch_size: int, hooks: Sequence[Hook] = (), state: TrainerState | None = None):
        self.run_step = run_step
        self.batches = batches
        self.last_step = last_step
        self.batch_size = batch_size
        self.hooks = list(hooks)
        self.state = state or TrainerState()

    @property
    def model(self) -> nn.Module:
        return self.run_step.model

    @property
    def optimizer(self) -> Any:
        return self.run_step.optimizer

    @property
    def scheduler(self) -> Any:
        return self.run_step.scheduler

    @property
    def done(self) -> bool:
        """Whether the last step has run."""
        return self.state.step >= self.last_step

    def train(self) -> None:
        """Steps from `state` to `last_step`; the hooks see `state` as each point is reached."""
        s = self.state
        while not self.done:
            skip, s.epoch_ended = s.batch_in_epoch, False
            for batch, waited in timed(self.batches(s.epoch, skip)):
                s.data_wait_s = waited
                self._call("before_step")
                s.result = self.run_step(batch, s.step)
                s.step += 1
                s.batch_in_epoch += 1
                self._call("after_step")
                if self.done:  # perhaps the epoch's last batch too; a resume finds out (it then gets none)
                    break
            else:
                s.epoch_ended = True
            if s.epoch_ended and s.batch_in_epoch == skip == 0:
                raise RuntimeError(f"an epoch gave this worker no batch of {self.batch_size}: fewer images than the "
                                   "batch")
            self._call("epoch_end")
            if s.epoch_ended:
                s.epoch, s.batch_in_epoch = s.resume_point()
        self._call("train_end")

    def before_checkpoint(self) -> None:
        """Every hook's `before_checkpoint`: called by the hook that writes checkpoints, right before it does."""
        self._call("before_checkpoint")

    def _call(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self)


def timed(batches: Iterable[dict]) -> Iterator[tuple[dict, float]]:
    """(batch, seconds this loop waited for it): the time spent blocked on the input pipeline, which a
    step time alone would leave out."""
    it = iter(batches)
    while True:
        started = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch, time.perf_counter() - started

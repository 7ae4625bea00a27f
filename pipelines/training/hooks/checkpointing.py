"""Checkpoints as a hook: every `train.checkpoint_every` steps and at each epoch's end, every rank reports to
Ray Train together (a barrier, so never every step) and rank 0 writes the checkpoint it hands over."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from typing import Any

from pipelines.training.checkpoints import gather_rng_states, save_checkpoint
from pipelines.training.trainer import Hook, Trainer

# what a report goes to: (metrics, the directory of rank 0's checkpoint, None on the other ranks)
Report = Callable[[dict[str, Any], str | None], None]


def report_to_ray(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
    """`ray.train.report`, with the directory as a Ray Train checkpoint (which Ray copies to the run's storage
    before it returns)."""
    import ray.train  # the worker's: this module imports without Ray

    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
    ray.train.report(metrics, checkpoint=checkpoint)


class CheckpointHook(Hook):
    """Reports `{"step", "epoch", the last validation losses, "val_loss" (inf before any: Ray's score attribute
    must exist in every report), and "loss" (after a step) or "nonfinite_steps" (at an epoch's end)}` with a
    checkpoint: the state after the step (every hook's `before_checkpoint` first), the position a resume continues
    from, `meta` and the validation losses in its meta.json, and every rank's random state.

    meta: `WorkerPlan.checkpoint_meta`; report: where reports go (Ray Train in a worker)."""

    def __init__(self, every: int, meta: dict[str, Any], *, rank: int, world: int, report: Report = report_to_ray):
        self.every = every
        self.meta = meta
        self.rank = rank
        self.world = world
        self.report = report

    def after_step(self, trainer: Trainer) -> None:
        if trainer.state.step % self.every == 0 and not trainer.done:  # the last step's: at its epoch's end
            self.save(trainer, {"loss": trainer.state.result.total})

    def epoch_end(self, trainer: Trainer) -> None:
        self.save(trainer, {"nonfinite_steps": trainer.run_step.nonfinite_total})

    def save(self, trainer: Trainer, extra: dict[str, float]) -> None:
        """A report with a checkpoint of now; every rank calls it at the same step (collectives inside)."""
        trainer.before_checkpoint()
        s = trainer.state
        epoch, batch_in_epoch = s.resume_point()
        metrics = {"step": s.step, "epoch": epoch, **s.val, **extra}
        metrics.setdefault("val_loss", math.inf)
        rng_by_rank = gather_rng_states(self.rank, self.world)  # every rank reports here together
        if self.rank != 0:
            self.report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(
                tmp, model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler, step=s.step,
                epoch=epoch, batch_in_epoch=batch_in_epoch, meta={**self.meta, **s.val},
                scaler=trainer.run_step.scaler, rng_by_rank=rng_by_rank,
            )
            self.report(metrics, tmp)

"""Post-local SGD as a hook (the schedule and the averaging: pipelines/training/local_sgd.py; the local steps'
missing all-reduce: the step, pipelines/training/step.py)."""

from __future__ import annotations

from pipelines.training.local_sgd import LocalSGD
from pipelines.training.trainer import Hook, Trainer


class LocalSGDHook(Hook):
    """Averages the workers' weights every `every` steps after the warm-up, at each epoch's end (before the
    validation loss and the epoch's checkpoint read them: listed before those hooks) and, with the optimizer's
    state, before every checkpoint. The checkpoint's sync right after the epoch's weight average averages the
    optimizer state only (`LocalSGD.sync` does not average the weights twice at one step count)."""

    def __init__(self, local_sgd: LocalSGD):
        self.local_sgd = local_sgd

    def after_step(self, trainer: Trainer) -> None:
        self.local_sgd.after_step(trainer.model, trainer.state.step)

    def epoch_end(self, trainer: Trainer) -> None:
        self.local_sgd.sync(trainer.model, trainer.state.step)

    def before_checkpoint(self, trainer: Trainer) -> None:
        # a checkpoint holds the workers' mean weights and optimizer state, which every rank then has
        self.local_sgd.sync(trainer.model, trainer.state.step, trainer.optimizer)

"""A plain per-step callback as a hook: `WorkerPlan.after_step`, where the tests hang their fault drills
(tests/support/fault_drill.py); production runs without it."""

from __future__ import annotations

from collections.abc import Callable

from pipelines.training.trainer import Hook, Trainer


class StepCallbackHook(Hook):
    """Calls `callback(step, rank)` after each step (listed last: after that step's checkpoint report)."""

    def __init__(self, callback: Callable[[int, int], None], *, rank: int):
        self.callback = callback
        self.rank = rank

    def after_step(self, trainer: Trainer) -> None:
        self.callback(trainer.state.step, self.rank)

"""Rank 0's console progress and MLflow metrics for the trainer, as a hook."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from pipelines.infra import tracking
from pipelines.infra.logs import get_logger, progress
from pipelines.training.trainer import Hook, Trainer

log = get_logger("train")


class ProgressHook(Hook):
    """Console progress and MLflow metrics, on rank 0 only (the worker gives it to rank 0 alone). Each logged step
    reports the window since the last one: images/s over its whole wall time, the mean step time (the step and
    the hooks before this one: local SGD's averaging), the mean time waited for data, and the fraction of the
    time that went to waiting (input_bound_fraction: near 0 when the input pipeline keeps up). The validation
    losses are logged after each epoch that computed them."""

    def __init__(self, every: int, total_steps: int, *, images_per_step: int, tracking_uri: str | None = None,
                 run_id: str | None = None):
        self.every = every
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.total = total_steps
        self.images_per_step = images_per_step  # the global batch
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.window = WindowTimes()
        self.step_started = self.start

    def before_step(self, trainer: Trainer) -> None:
        self.step_started = time.perf_counter()

    def after_step(self, trainer: Trainer) -> None:
        step_s = time.perf_counter() - self.step_started
        step, epoch, result = trainer.state.step, trainer.state.epoch, trainer.state.result
        if self.first_step is None:
            self.first_step = step - 1
        self.window.add(data_wait_s=trainer.state.data_wait_s, step_s=step_s, images=self.images_per_step)
        if step % self.every and step != self.total:
            return
        timing = self.window.summary()
        self.window = WindowTimes()
        elapsed = time.perf_counter() - self.start
        done = step - self.first_step
        eta = elapsed / max(done, 1) * (self.total - step)
        losses = " ".join(f"{k.removeprefix('loss_')}={v:.3f}" for k, v in result.losses.items())
        log.info("step %s epoch %d loss=%.4f %s lr=%.5f step %.3fs data wait %.3fs",
                 progress(step, self.total, rate=timing["images_per_s"], unit="img/s", eta=eta), epoch, result.total,
                 losses, result.lr, timing["step_s"], timing["data_wait_s"])
        if self.run_id:
            metrics = {**result.losses, "lr": result.lr, "epoch": epoch, **timing}
            metrics["nonfinite_steps"] = trainer.run_step.nonfinite_total
            if math.isfinite(result.total):
                metrics["loss"] = result.total
            tracking.log_metrics(self.tracking_uri, self.run_id, metrics, step=step)

    def epoch_end(self, trainer: Trainer) -> None:
        s = trainer.state
        if s.val_step != s.step or not s.val:  # no validation at this epoch's end
            return
        log.info("validation after epoch %d: val_loss=%.4f", s.epoch, s.val["val_loss"])
        if self.run_id:
            tracking.log_metrics(self.tracking_uri, self.run_id, s.val, step=s.step)

    def train_end(self, trainer: Trainer) -> None:
        log.info("done in %.0fs", time.perf_counter() - self.start)


@dataclass
class WindowTimes:
    """Step and data-wait times of the steps since the last logged one."""

    steps: int = 0
    images: int = 0
    data_wait_s: float = 0.0
    step_s: float = 0.0

    def add(self, *, data_wait_s: float, step_s: float, images: int) -> None:
        self.steps += 1
        self.images += images
        self.data_wait_s += data_wait_s
        self.step_s += step_s

    def summary(self) -> dict[str, float]:
        """images_per_s (all ranks' images over wait + step time), mean step_s and data_wait_s a step, and
        input_bound_fraction = wait / (wait + step)."""
        wall = self.data_wait_s + self.step_s
        n = max(self.steps, 1)
        return {"images_per_s": self.images / max(wall, 1e-9), "step_s": self.step_s / n,
                "data_wait_s": self.data_wait_s / n, "input_bound_fraction": self.data_wait_s / max(wall, 1e-9)}

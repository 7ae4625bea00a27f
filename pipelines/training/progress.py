"""Rank 0's console progress and MLflow metrics for the training loop (`pipelines.training.loop`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from pipelines.infra import tracking
from pipelines.infra.logs import get_logger, progress

log = get_logger("train")


class RankZeroLogger:
    """Console progress and MLflow metrics, from rank 0 only. Each logged step reports the window since the
    last one: images/s over its whole wall time, the mean step time, the mean time waited for data, and the
    fraction of the time that went to waiting (input_bound_fraction: near 0 when the input pipeline keeps up)."""

    def __init__(self, every: int, total_steps: int, *, tracking_uri: str | None = None, run_id: str | None = None):
        self.every = every
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.total = total_steps
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.window = WindowTimes()

    def step(self, step: int, epoch: int, result: Any, runner: Any, *, data_wait_s: float,
             step_s: float, images: int) -> None:
        if self.first_step is None:
            self.first_step = step - 1
        self.window.add(data_wait_s=data_wait_s, step_s=step_s, images=images)
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
            metrics["nonfinite_steps"] = runner.nonfinite_total
            if math.isfinite(result.total):
                metrics["loss"] = result.total
            tracking.log_metrics(self.tracking_uri, self.run_id, metrics, step=step)

    def validation(self, step: int, epoch: int, val: dict[str, float]) -> None:
        if not val:
            return
        log.info("validation after epoch %d: val_loss=%.4f", epoch, val["val_loss"])
        if self.run_id:
            tracking.log_metrics(self.tracking_uri, self.run_id, val, step=step)

    def close(self) -> None:
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

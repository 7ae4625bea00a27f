"""One optimisation step (`StepRunner`, the trainer's `run_step`) and the all-ranks non-finite decision.

Plain torch: tested without Ray (tests/pipelines/training/test_loop.py) and imported by the benches, the
inspection's flip picture and the GPU tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mrcnn.flip import flip_batch
from pipelines.data.loader import densify_rpn_deltas, to_device
from pipelines.training.local_sgd import LocalSGD, gradient_sync
from pipelines.training.optim import freeze_norm_statistics
from pipelines.training.precision import Precision, resolve_precision


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row produced a NaN/inf loss."""


@dataclass
class StepResult:
    """One step's loss terms (host floats), their total (NaN for a skipped step), whether the loss was finite
    (on every rank unless the step was local) and the learning rate it ran at."""

    losses: dict[str, float]
    total: float
    finite: bool
    lr: float


@dataclass
class StepRunner:
    """One optimisation step: sparse RPN targets densified and the flip applied on the device, forward under
    the chosen autocast, one all-ranks non-finite decision, loss scaling (fp16), clip, step.

    One device -> host transfer a step (every loss value, the total and the all-reduced finite flag together);
    the flip permutation moves to the device once."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    grad_clip: float
    flip: bool = True
    flip_perm: torch.Tensor | None = None
    seed: int = 0
    rank: int = 0
    max_nonfinite_in_a_row: int = 10
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    precision: Precision | None = None  # None: float32 (no autocast)
    scaler: torch.amp.GradScaler | None = field(default=None)  # fp16 only; None builds it from `precision`
    # post-local SGD (`train.local_sgd_every`): its local steps run without the gradient all-reduce and without
    # the all-ranks finite decision (a rank that skips a step alone pairs no collective wrongly); None: off
    local_sgd: LocalSGD | None = None

    def __post_init__(self):
        if self.flip_perm is not None:  # a constant: on the device once, not copied there every step
            self.flip_perm = self.flip_perm.to(self.device)
        if self.precision is None:
            self.precision = resolve_precision("off", self.device)
        if self.scaler is None:
            self.scaler = self.precision.grad_scaler()

    def flip_choice(self, step: int, n: int) -> torch.Tensor:
        """Which images of the batch are flipped at `step`: a pure function of (seed, step, rank), so a
        resumed run flips exactly as an uninterrupted one."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 7919 + self.rank)
        return torch.rand(n, generator=gen) < 0.5

    def __call__(self, batch: dict[str, torch.Tensor], step: int) -> StepResult:
        if self.flip and self.flip_perm is None:
            raise ValueError("flip augmentation needs the anchors' flip permutation (model.flip_perm), and this model "
                             "has none: its anchors are not mirror-symmetric; train with train.flip=false")
        batch = densify_rpn_deltas(to_device(batch, self.device))
        if self.flip and self.flip_perm is not None:
            which = self.flip_choice(step, batch["images"].shape[0])  # on the host: flip_batch reads it there
            batch = flip_batch(batch, flip_perm=self.flip_perm, which=which)
        self.model.train()
        freeze_norm_statistics(self.model)  # frozen stages (--layers heads / 4+) keep their BatchNorm statistics
        local = self.local_sgd is not None and self.local_sgd.local(step)
        with gradient_sync(self.model, local=local):
            return self._step(batch, local=local)

    def _step(self, batch: dict[str, torch.Tensor], *, local: bool) -> StepResult:
        with self.precision.autocast():
            loss_dict = self.model(batch)
        total = sum(loss_dict.values())
        lr = self.optimizer.param_groups[0]["lr"]
        # stays on the device: the all-reduce needs no host sync
        flag = finite_flag_on_every_rank(total, collective=not local)
        # every loss value, the total and the flag in ONE device -> host transfer (not one sync per value)
        host = torch.cat([torch.stack([v.detach().float().reshape(()) for v in (*loss_dict.values(), total)]),
                          flag.float()]).cpu().tolist()
        values, total_value, finite = dict(zip(loss_dict, host[:-2], strict=True)), host[-2], bool(host[-1])
        if not finite:
            # skip the step on every rank together: no update from a NaN/inf gradient; give up after too many
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} steps in a row gave a non-finite loss (last: {values}); "
                    "lower train.lr or check the data"
                )
            self.scheduler.step()
            return StepResult(values, float("nan"), False, lr)
        self.nonfinite_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler
        (scaler.scale(total) if scaler is not None else total).backward()
        if self.grad_clip > 0:
            if scaler is not None:
                scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.grad_clip)
        if scaler is not None:
            scaler.step(self.optimizer)  # skipped by the scaler where fp16 gradients overflowed
            scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return StepResult(values, total_value, True, lr)


def finite_flag_on_every_rank(total: torch.Tensor, *, collective: bool = True) -> torch.Tensor:
    """int32 [1] on the loss's device: 1 where the loss is finite on EVERY rank, else 0 (a MIN all-reduce under
    torch.distributed), so that all ranks skip a step together. A rank that skipped `backward()` alone would
    pair the others' gradient all-reduces with its next step's, averaging mismatched gradients or hanging.
    No host sync: the flag is read with the loss values in the step's one transfer. `collective=False` (a local
    SGD step, no all-reduce to pair): this rank's own flag."""
    flag = torch.isfinite(total.detach()).to(torch.int32).reshape(1)
    if collective and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return flag

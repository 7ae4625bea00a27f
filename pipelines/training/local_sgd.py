"""Post-local SGD (`train.local_sgd_every`): after the learning-rate warm-up, each worker steps on its own
gradients (DDP's `no_sync()`, no all-reduce in the backward pass) and the workers' weights are averaged every
`every` steps, and before anything reads them (a checkpoint, the validation loss, the end of training).

Lin et al., "Don't use large mini-batches, use local SGD" (2018); torch ships the same algorithm as
`PeriodicModelAverager` + `post_localSGD_hook`. Ours differs in two ways that matter here: the averaged weights
are copied back into the parameters in place (torch's replaces `param.data` with views of one flat buffer,
which drops a channels_last layout and makes every convolution re-layout its weights), and the schedule is a
pure function of the step, so a resumed run averages where an uninterrupted one did.

Where it pays: CPU workers sharing a box, where DDP's every-step all-reduce ties the workers together (each step
waits for the slower one, and on 2 cores Ray's own processes stall one or the other): the demo's loop under Ray
Train steps 10.4 images/s with DDP and 17-18 with local SGD every 8 steps (BENCHMARKS.md). On GPUs with NCCL
the all-reduce overlaps the backward pass and costs little: off there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def averaged_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What the workers average: every floating-point parameter and the running statistics of every
    BatchNorm (each worker's own batches move them). Constant buffers (anchors, pixel statistics) are left:
    they are equal on every rank."""
    tensors = [p for p in model.parameters() if p.is_floating_point()]
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            tensors += [m.running_mean, m.running_var]
    return tensors


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's floating-point state (SGD's momentum, AdamW's two moments) in parameter order, the
    same order on every rank."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            out += [state[k] for k in sorted(state) if torch.is_tensor(state[k]) and state[k].is_floating_point()
                    and k != "step"]
    return out


@torch.no_grad()
def average_tensors(tensors: list[torch.Tensor]) -> None:
    """Replace every rank's `tensors` by their mean over the default process group, in one all-reduce of a flat
    buffer; each tensor keeps its storage, memory format and dtype. A collective: every rank calls it together
    with the same list of shapes. Nothing happens without torch.distributed or with a single rank."""
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view(t.shape))  # copy_ keeps t's strides (channels_last) and dtype
        offset += n


@dataclass
class LocalSGD:
    """When the workers step alone and when they average.

    `every` = `train.local_sgd_every` (0: off, every step's gradients are all-reduced), `start` = the first
    local step (the lr warm-up's length: the first steps move the weights furthest and are kept in sync).
    Steps are counted from 0; `local(step)` is asked before step `step` runs, `due(done)` after `done` steps."""

    every: int
    start: int
    averaged_at: int = -1  # the step count at which the weights were last averaged

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def local(self, step: int) -> bool:
        """Whether step `step` (0-based) runs without the gradient all-reduce."""
        return self.enabled and step >= self.start

    def due(self, done: int) -> bool:
        """Whether the weights are averaged after `done` steps on the periodic schedule."""
        return self.enabled and done > self.start and (done - self.start) % self.every == 0

    def after_step(self, model: nn.Module, done: int) -> bool:
        """Average after `done` steps if the schedule says so; returns whether it did."""
        return self.due(done) and self.sync(model, done)

    def sync(self, model: nn.Module, done: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Average now (before the validation loss, the end) unless the weights are equal already: no local
        step ran since the last average. Every rank calls it at the same step. With `optimizer` (before a
        checkpoint) its state is averaged too, every time: the checkpoint then holds what every rank has, so a
        resume from it continues as the uninterrupted run did. Returns whether anything was averaged."""
        if not self.enabled or done <= self.start:
            return False
        weights = averaged_tensors(model) if self.averaged_at != done else []  # not twice at one step count
        tensors = weights + (optimizer_tensors(optimizer) if optimizer is not None else [])
        if not tensors:
            return False
        average_tensors(tensors)
        self.averaged_at = done
        return True


def gradient_sync(model: nn.Module, *, local: bool) -> contextlib.AbstractContextManager:
    """The context a step's forward and backward run in: DDP's `no_sync()` for a local step (its forward must
    be inside too: that is where DDP prepares the all-reduce), nothing otherwise or for a bare model."""
    if local and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()

"""The validation loss as a hook: the mean loss terms over the "val" split, every `train.val_every` epochs and
after the last step, on every rank (the sums are all-reduced)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from mrcnn.model import LOSS_KEYS
from pipelines.data.loader import densify_rpn_deltas, to_device
from pipelines.training.trainer import Hook, Trainer


class ValidationHook(Hook):
    """At each epoch's end where `validation_due`: `validation_losses` of `batches()` (the split, streamed
    again each time) into `trainer.state.val`, which the progress and checkpoint hooks read."""

    def __init__(self, batches: Callable[[], Iterable[dict[str, torch.Tensor]]], *, device: torch.device,
                 every: int):
        self.batches = batches
        self.device = device
        self.every = every

    def epoch_end(self, trainer: Trainer) -> None:
        s = trainer.state
        if validation_due(s.epoch, done=trainer.done, epoch_ended=s.epoch_ended, every=self.every):
            s.val = validation_losses(trainer.model, self.batches(), self.device)
            s.val_step = s.step


def validation_losses(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> dict:
    """Mean loss terms over `batches` with no update: the model in training mode (losses need targets) but
    BatchNorm in eval mode so running statistics stay as they are, and the global RNG left untouched (the
    samplers draw from it) so validation never changes the course of training. Under torch.distributed every
    rank must call it: the sums are all-reduced, so each rank returns the mean over every rank's batches."""
    was_training = model.training
    model.train()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
    sums = torch.zeros(len(LOSS_KEYS) + 1, dtype=torch.float64)  # the loss terms in LOSS_KEYS order, then count
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for batch in batches:
            losses = model(densify_rpn_deltas(to_device(batch, device)))
            sums += torch.tensor([float(losses[k]) for k in LOSS_KEYS] + [1.0], dtype=torch.float64)
    model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reduced = sums.to(device)  # NCCL reduces CUDA tensors only
        torch.distributed.all_reduce(reduced)
        sums = reduced.cpu()
    count = float(sums[-1])
    if count == 0:
        return {}
    mean = {f"val_{k}": float(v) / count for k, v in zip(LOSS_KEYS, sums[:-1], strict=True)}
    mean["val_loss"] = sum(mean.values())
    return mean


def validation_due(epoch: int, *, done: bool, epoch_ended: bool, every: int) -> bool:
    """Whether the validation loss is computed now, after `epoch` (0-based) ran to its end or was cut short by
    the last step: always after the last step, else after every `every`-th epoch (`train.val_every`; 0 = never
    before the last step: each validation re-streams the split, some 10 s on a small CPU box)."""
    return done or (epoch_ended and every > 0 and (epoch + 1) % every == 0)

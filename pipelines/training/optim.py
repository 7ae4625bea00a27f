"""Optimisation: stage-wise trainable layers, SGD or AdamW, and the learning-rate schedule.

Pure helpers used by the per-worker training loop (`pipelines.training.loop`, `step`) and tested on their own.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable

import torch
from torch import nn

from mrcnn.config import Optimizer, Schedule

# Which parameters each `--layers` choice trains, as in matterport's and the seed's stage-wise COCO
# training: "heads" freezes the whole ResNet (FPN, RPN and RoI heads train), "4+" trains ResNet from stage 4
# up, "all" trains everything (frozen BatchNorm stays frozen: it has no parameters).
_RESNET_STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


LAYER_CHOICES = {
    "heads": set(_RESNET_STAGES),
    "3+": {"conv1", "bn1", "layer1"},
    "4+": {"conv1", "bn1", "layer1", "layer2"},
    "5+": {"conv1", "bn1", "layer1", "layer2", "layer3"},
    "all": set(),
}


def resnet_stage(param_name: str) -> str | None:
    """The ResNet stage a parameter belongs to ('layer3', 'conv1', ...), or None outside the ResNet body.

    Parameter names look like `backbone.body.layer3.0.conv1.weight` (DDP adds a `module.` prefix); the first
    ResNet stage name after `backbone` decides, so FPN layers (`backbone.fpn.*`, `fpn.*`) are never a stage.
    """
    parts = param_name.split(".")
    if "backbone" not in parts:
        return None
    for part in parts[parts.index("backbone") + 1 :]:
        if part in _RESNET_STAGES:
            return part
        if part.startswith("fpn"):
            return None
    return None


def set_trainable_layers(model: nn.Module, layers: str) -> list[str]:
    """Freeze the ResNet stages that `layers` excludes; returns the names of the frozen parameters."""
    if layers not in LAYER_CHOICES:
        raise ValueError(f"--layers {layers!r}: choose one of {', '.join(LAYER_CHOICES)}")
    frozen_stages = LAYER_CHOICES[layers]
    frozen = []
    for name, param in model.named_parameters():
        stage = resnet_stage(name)
        train_it = stage is None or stage not in frozen_stages
        if not train_it:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def freeze_norm_statistics(model: nn.Module) -> int:
    """Put every BatchNorm whose affine parameters are frozen into eval mode, so that its running statistics stay
    as they are too (a frozen stage must not change at all; `model.train()` would otherwise let them move with
    every batch). Call it after each `model.train()`; returns how many norms it froze."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            params = [p for p in (module.weight, module.bias) if p is not None]
            if params and not any(p.requires_grad for p in params):
                module.eval()
                count += 1
    return count


def scaled_lr(base_lr: float, *, global_batch: int, reference_batch: int) -> float:
    """Linear scaling rule (Goyal et al.): lr is given per `reference_batch` images."""
    return base_lr * global_batch / reference_batch


OPTIMIZERS = typing.get_args(Optimizer)  # a Config holds only these; the checks here are for other callers


def build_optimizer(
    model: nn.Module, *, lr: float, momentum: float, weight_decay: float, kind: str = "sgd"
) -> torch.optim.Optimizer:
    """SGD (or AdamW, betas (momentum, 0.999)) over trainable parameters; no weight decay on biases and norm
    parameters (1-d tensors)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"train.optimizer {kind!r}: choose one of {', '.join(OPTIMIZERS)}")
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernels update every parameter in one pass: on a CPU AdamW's step takes 21 ms instead of 93 ms
    # for the shapes model (12.5 M parameters, one thread), 7% of its training step (BENCHMARKS.md).
    fused = _fused_supported(decay + no_decay) or None
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), fused=fused)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused)


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """The fused optimizer kernels take floating-point parameters on one CPU or CUDA device."""
    return bool(params) and all(p.is_floating_point() for p in params) and len({p.device for p in params}) == 1 \
        and params[0].device.type in ("cpu", "cuda")


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    decay_at: tuple[float, ...] = (),
    decay_factor: float = 0.1,
    warmup_start: float = 0.001,
) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warm-up, then step or cosine decay."""
    if schedule not in typing.get_args(Schedule):
        raise ValueError(f"train.schedule {schedule!r}: expected one of {', '.join(typing.get_args(Schedule))}")
    if schedule == "step":
        factor = decay_factor ** sum(step >= int(f * total_steps) for f in decay_at)
    else:
        progress = min(step, total_steps) / max(total_steps, 1)
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    if warmup_steps > 0 and step < warmup_steps:
        alpha = step / warmup_steps
        factor *= warmup_start * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, **schedule_kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor`; its state (last_epoch = step) goes into checkpoints."""
    fn: Callable[[int], float] = lambda step: lr_factor(step, **schedule_kwargs)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

"""Mixed precision for training (`train.amp`): which autocast dtype a device gets, and the fp16 GradScaler.

    auto   bf16 autocast on a GPU with bf16 (compute capability 8.0+: A100, H100, L4, RTX 30xx+),
           fp16 autocast with a GradScaler on one without (V100, T4), no autocast on CPU
    bf16   bf16 autocast (CUDA, or CPU where torch supports it); no scaler: bf16 has fp32's exponent range
    fp16   fp16 autocast and a GradScaler (dynamic loss scaling; its state is saved in checkpoints)
    off    float32 throughout

Pure decisions, importable without Ray: the GPU tests and bench/bench_gpu.py use them too.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class Precision:
    """What `train.amp` resolved to on one device: the autocast dtype (None: no autocast) and whether the
    loss is scaled (fp16 only)."""

    setting: str
    device_type: str
    dtype: torch.dtype | None
    scaled: bool

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[self.dtype]

    def describe(self) -> str:
        """The line a worker prints: what was chosen, and why where `auto` chose."""
        why = f" (train.amp=auto on {self.device_type})" if self.setting == "auto" else ""
        scaler = " with a GradScaler" if self.scaled else ""
        return f"mixed precision: {self.name}{scaler}{why}"

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh GradScaler for fp16, else None (bf16 and fp32 need no loss scaling)."""
        return torch.amp.GradScaler(self.device_type) if self.scaled else None


def resolve_precision(setting: str, device: torch.device, *, bf16_supported: bool | None = None) -> Precision:
    """`train.amp` on `device`. bf16_supported: whether the GPU computes in bf16 (None: ask torch, on CUDA)."""
    if setting not in AMP_CHOICES:
        raise ValueError(f"train.amp {setting!r}: choose one of {', '.join(AMP_CHOICES)}")
    kind = device.type
    if setting == "auto":
        if kind != "cuda":
            return Precision(setting, kind, None, False)
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
        setting_dtype = torch.bfloat16 if bf16_supported else torch.float16
        return Precision(setting, kind, setting_dtype, setting_dtype == torch.float16)
    if setting == "off":
        return Precision(setting, kind, None, False)
    dtype = torch.bfloat16 if setting == "bf16" else torch.float16
    return Precision(setting, kind, dtype, dtype == torch.float16)

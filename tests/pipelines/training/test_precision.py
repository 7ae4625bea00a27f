"""train.amp: the choice for each kind of device, and the fp16 path's GradScaler through a checkpoint."""

import pytest
import torch
from torch import nn

from mrcnn.config import ConfigError, shapes
from pipelines.training.checkpoints import load_checkpoint, restore
from pipelines.training.optim import build_scheduler
from pipelines.training.precision import resolve_precision
from pipelines.training.step import StepRunner

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize(("setting", "device", "bf16", "dtype", "scaled"), [
    ("auto", CUDA, True, torch.bfloat16, False),  # A100 / H100: bf16, no loss scaling
    ("auto", CUDA, False, torch.float16, True),  # V100 / T4: fp16 with a GradScaler
    ("auto", CPU, None, None, False),  # CPU: float32
    ("off", CUDA, True, None, False),
    ("bf16", CUDA, False, torch.bfloat16, False),  # forced: what was asked for
    ("fp16", CUDA, True, torch.float16, True),
    ("bf16", CPU, None, torch.bfloat16, False),
])
def test_the_amp_choice_for_each_kind_of_device(setting, device, bf16, dtype, scaled):
    p = resolve_precision(setting, device, bf16_supported=bf16)
    assert (p.dtype, p.scaled) == (dtype, scaled)
    if device.type == "cpu" or torch.cuda.is_available():
        assert (p.grad_scaler() is not None) == scaled
    assert p.name in p.describe() and ("GradScaler" in p.describe()) == scaled
    assert ("auto" in p.describe()) == (setting == "auto")


def test_unknown_amp_settings_are_refused_when_the_config_is_built():
    with pytest.raises(ConfigError, match=r"'train\.amp'.*'auto', 'bf16', 'fp16', 'off'"):
        shapes().override(["train.amp=fp8"])
    # YAML reads `off` as False: a word setting takes the word
    assert shapes().override(["train.amp=off"]).train.amp == "off"
    with pytest.raises(ValueError, match="train.amp"):
        resolve_precision("fp8", CPU)


class _Quadratic(nn.Module):
    """Loss terms sum((w - 3)^2) weighted 1..5: gradients known by hand, a step changes w."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))

    def forward(self, batch):
        base = ((self.w - 3) ** 2).sum() * batch["x"].sum()
        return {f"loss_{i}": base * (i + 1) for i in range(5)}


def _fp16_runner(model, **scaler):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=0, schedule="cosine")
    precision = resolve_precision("fp16", CPU)
    return StepRunner(model=model, optimizer=opt, scheduler=sched, device=CPU, grad_clip=1.0, flip=False,
                      precision=precision, scaler=torch.amp.GradScaler("cpu", **scaler) if scaler else None)


def test_fp16_steps_scale_the_loss_and_the_scaler_state_round_trips_a_checkpoint(tmp_path):
    from pipelines.training.checkpoints import save_checkpoint

    model = _Quadratic()
    assert _fp16_runner(model).scaler.is_enabled()  # fp16 builds its own GradScaler
    runner = _fp16_runner(model, init_scale=1024.0)  # a state that differs from a fresh scaler's (65536)
    result = runner({"x": torch.ones(1)}, 0)
    assert result.finite and not torch.equal(model.w.detach(), torch.zeros(4))
    # clipped to norm 1 AFTER unscaling: one SGD step of lr 0.01 moves w by at most 0.01 in norm
    assert float(model.w.detach().norm()) == pytest.approx(0.01, rel=1e-3)
    save_checkpoint(tmp_path / "ck", model=model, optimizer=runner.optimizer, scheduler=runner.scheduler, step=1,
                    epoch=0, batch_in_epoch=1, meta={}, scaler=runner.scaler)
    assert load_checkpoint(tmp_path / "ck").scaler["scale"] == runner.scaler.get_scale() == 1024.0
    fresh = _fp16_runner(_Quadratic())
    fresh.scaler.scale(torch.ones(()))  # initialises the fresh scale
    assert fresh.scaler.get_scale() == 65536.0
    restore(str(tmp_path / "ck"), fresh.model, fresh.optimizer, fresh.scheduler, scaler=fresh.scaler)
    assert fresh.scaler.state_dict() == runner.scaler.state_dict()
    assert torch.equal(fresh.model.w, model.w)

import math

import pytest
import torch
from torch import nn

from pipelines.training.optim import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    resnet_stage,
    scaled_lr,
    set_trainable_layers,
)


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.layer1, self.layer2, self.layer3, self.layer4 = (nn.Linear(2, 2) for _ in range(4))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = _Body()
        self.backbone.fpn = nn.Linear(2, 2)
        self.rpn = nn.Linear(2, 2)


def test_resnet_stage_names():
    assert resnet_stage("backbone.body.layer3.0.conv1.weight") == "layer3"
    assert resnet_stage("module.backbone.body.conv1.weight") == "conv1"
    assert resnet_stage("backbone.fpn.layer_blocks.0.weight") is None
    assert resnet_stage("roi_heads.mask_head.conv1.weight") is None


@pytest.mark.parametrize(
    "layers, trained",
    [
        ("heads", set()),
        ("4+", {"layer3", "layer4"}),
        ("all", {"conv1", "layer1", "layer2", "layer3", "layer4"}),
    ],
)
def test_set_trainable_layers(layers, trained):
    model = _Toy()
    set_trainable_layers(model, layers)
    stages = {resnet_stage(n) for n, p in model.named_parameters() if p.requires_grad} - {None}
    assert stages == trained
    # FPN and heads always train
    assert model.backbone.fpn.weight.requires_grad and model.rpn.weight.requires_grad


def test_unknown_layers_choice():
    with pytest.raises(ValueError, match="--layers"):
        set_trainable_layers(_Toy(), "5")


def test_linear_scaling_rule():
    assert scaled_lr(0.02, global_batch=16, reference_batch=16) == 0.02
    assert scaled_lr(0.02, global_batch=2, reference_batch=16) == pytest.approx(0.0025)


def test_warmup_then_step_decay_known_values():
    kw = dict(total_steps=100, warmup_steps=10, schedule="step", decay_at=(0.5, 0.8), decay_factor=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.001)
    assert lr_factor(5, **kw) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, **kw) == 1.0
    assert lr_factor(49, **kw) == 1.0
    assert lr_factor(50, **kw) == pytest.approx(0.1)
    assert lr_factor(80, **kw) == pytest.approx(0.01)


def test_cosine_schedule_known_values():
    kw = dict(total_steps=100, warmup_steps=0, schedule="cosine")
    assert lr_factor(0, **kw) == 1.0
    assert lr_factor(50, **kw) == pytest.approx(0.5)
    assert lr_factor(100, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(25, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_scheduler_drives_optimizer_and_resumes_identically():
    def make():
        model = nn.Linear(3, 2)
        opt = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
        sched = build_scheduler(opt, total_steps=20, warmup_steps=4, schedule="cosine")
        return opt, sched

    opt, sched = make()
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    opt2, sched2 = make()
    for _ in range(6):
        opt2.step()
        sched2.step()
    opt3, sched3 = make()
    # as in a checkpoint: the optimizer state carries the current lr, the scheduler its step count
    opt3.load_state_dict(opt2.state_dict())
    sched3.load_state_dict(sched2.state_dict())
    # the resumed schedule continues where the first left off
    resumed = []
    for _ in range(6):
        resumed.append(opt3.param_groups[0]["lr"])
        opt3.step()
        sched3.step()
    assert resumed == pytest.approx(lrs[6:])
    assert lrs[0] == pytest.approx(0.1 * 0.001)


def test_no_weight_decay_on_biases():
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.weight) in decay and id(model.bias) not in decay
    frozen = nn.Linear(3, 2)
    frozen.weight.requires_grad_(False)
    opt = build_optimizer(frozen, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert sum(len(g["params"]) for g in opt.param_groups) == 1
    assert torch.is_tensor(opt.param_groups[1]["params"][0])


def test_adamw_takes_momentum_as_beta1_and_decays_weights_only():
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, lr=1e-3, momentum=0.8, weight_decay=0.05, kind="adamw")
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.8, 0.999)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    # one step from zero gradients' moments: AdamW moves every weight by lr * (sign of grad) + decoupled decay
    model.weight.grad = torch.ones_like(model.weight)
    model.bias.grad = -torch.ones_like(model.bias)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt.step()
    assert torch.allclose(model.weight, w0 * (1 - 1e-3 * 0.05) - 1e-3, atol=1e-6)
    assert torch.allclose(model.bias, b0 + 1e-3, atol=1e-6)


def test_unknown_optimizer_is_refused_by_name():
    with pytest.raises(ValueError, match="train.optimizer 'lamb'"):
        build_optimizer(nn.Linear(3, 2), lr=0.1, momentum=0.9, weight_decay=0.0, kind="lamb")


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fused_step_matches_the_reference_implementation(kind):
    """build_optimizer takes the fused kernels on a CPU: ten steps land where torch's per-parameter loop does."""
    torch.manual_seed(0)
    fused_model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    loop_model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    loop_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, lr=0.01, momentum=0.9, weight_decay=0.1, kind=kind)
    assert all(g["fused"] for g in fused.param_groups)
    groups = [{"params": [p for p in loop_model.parameters() if p.ndim > 1], "weight_decay": 0.1},
              {"params": [p for p in loop_model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    reference = (torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.999), foreach=False) if kind == "adamw"
                 else torch.optim.SGD(groups, lr=0.01, momentum=0.9, foreach=False))
    x, y = torch.randn(16, 5), torch.randn(16, 2)
    start = fused_model[0].weight.detach().clone()
    for model, opt in ((fused_model, fused), (loop_model, reference)):
        for _ in range(10):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert (fused_model[0].weight - start).abs().max() > 1e-3  # the steps did move the weights


def test_no_fused_kernels_for_parameters_on_two_devices():
    from pipelines.training.optim import _fused_supported

    assert _fused_supported([torch.zeros(2)])
    assert not _fused_supported([torch.zeros(2), torch.zeros(2, device="meta")])
    assert not _fused_supported([])

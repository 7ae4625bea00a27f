"""The per-worker loop's parts, without Ray Train: one step, the non-finite guard, flips, validation."""

from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from mrcnn.config import shapes
from mrcnn.model import build_model
from pipelines.loader import ShardBatchDecoder, decoder_for
from pipelines.optim import build_optimizer, build_scheduler
from pipelines.train_loop import NonFiniteLossError, StepRunner, total_steps_for, validation_losses


@pytest.fixture(scope="module")
def batch(synth_shards):
    table = pq.read_table(f"{synth_shards}/train2017").slice(0, 2)
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    config = shapes()
    torch.manual_seed(0)
    model = build_model(config, num_classes=4)
    decoded = ShardBatchDecoder(**decoder_for(config, model.anchors.shape[0]))(rows)
    return {k: torch.as_tensor(v) for k, v in decoded.items()}


def _runner(model, **kw):
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=0, schedule="cosine")
    return StepRunner(model=model, optimizer=opt, scheduler=sched, device=torch.device("cpu"), grad_clip=5.0,
                      flip_perm=getattr(model, "flip_perm", None), **kw)


def test_one_step_updates_the_model_and_the_schedule(batch):
    torch.manual_seed(0)
    model = build_model(shapes(), num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = _runner(model)
    result = runner(batch, step=0)
    assert result.finite and set(result.losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask"}
    assert result.total == pytest.approx(sum(result.losses.values()), rel=1e-5)
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any("rpn" in k for k in changed) and any("mask" in k for k in changed)
    assert runner.scheduler.last_epoch == 1


class _NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, batch):
        return {"loss_cls": self.w * float("nan")}


def test_non_finite_steps_are_skipped_counted_then_stop(batch):
    model = _NaNModel()
    runner = _runner(model, flip=False, max_nonfinite_in_a_row=3)
    for step in range(2):
        result = runner(batch, step)
        assert not result.finite
    assert model.w.item() == 1.0 and runner.nonfinite_total == 2  # no update from a NaN
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        runner(batch, 2)


def test_flip_choice_is_a_function_of_seed_step_and_rank():
    model = nn.Linear(1, 1)
    a = StepRunner(model=model, optimizer=None, scheduler=None, device=torch.device("cpu"), grad_clip=0, seed=1)
    b = StepRunner(model=model, optimizer=None, scheduler=None, device=torch.device("cpu"), grad_clip=0, seed=1)
    c = StepRunner(model=model, optimizer=None, scheduler=None, device=torch.device("cpu"), grad_clip=0, seed=1, rank=1)
    assert torch.equal(a.flip_choice(5, 64), b.flip_choice(5, 64))
    assert not torch.equal(a.flip_choice(5, 64), a.flip_choice(6, 64))
    assert not torch.equal(a.flip_choice(5, 64), c.flip_choice(5, 64))
    assert 16 < int(a.flip_choice(5, 64).sum()) < 48


def test_validation_changes_neither_weights_nor_bn_stats_nor_rng(batch):
    torch.manual_seed(0)
    model = build_model(shapes(), num_classes=4)  # shapes: trainable BatchNorm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    val = validation_losses(model, [batch, batch], torch.device("cpu"))
    assert set(val) == {"val_loss", "val_loss_rpn_cls", "val_loss_rpn_box", "val_loss_cls", "val_loss_box",
                        "val_loss_mask"}
    assert val["val_loss"] == pytest.approx(sum(v for k, v in val.items() if k != "val_loss"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training


def test_total_steps_for():
    c = shapes()
    assert total_steps_for(replace(c, train=replace(c.train, steps=0, epochs=3)), train_images=10, global_batch=4) == (
        6, 2)
    assert total_steps_for(replace(c, train=replace(c.train, steps=7)), train_images=10, global_batch=4) == (7, 2)

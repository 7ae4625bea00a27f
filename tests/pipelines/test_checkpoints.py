import json
import pickle

import pytest
import torch
from torch import nn

from pipelines.checkpoints import (
    CheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from pipelines.optim import build_optimizer, build_scheduler


def _parts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, schedule="step", decay_at=(0.5,))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched = _parts()
    rng_before = torch.get_rng_state()
    save_checkpoint(
        tmp_path / "checkpoint_000001", model=model, optimizer=opt, scheduler=sched, step=7, epoch=2,
        batch_in_epoch=3, meta={"categories": {"coco_ids": [1, 3]}, "config": {"name": "x"}},
    )
    expected_next = torch.rand(3)
    state = load_checkpoint(tmp_path / "checkpoint_000001")
    assert (state.step, state.epoch, state.batch_in_epoch) == (7, 2, 3)
    assert state.meta["categories"] == {"coco_ids": [1, 3]}
    for k, v in model.state_dict().items():
        assert torch.equal(state.model[k], v)
    assert state.optimizer["state"][0]["momentum_buffer"].shape == (8, 4)
    assert state.scheduler["last_epoch"] == 1
    torch.set_rng_state(state.rng)
    assert torch.equal(torch.rand(3), expected_next)
    assert torch.equal(state.rng, rng_before)


def test_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    d = tmp_path / "checkpoint_x"
    d.mkdir()
    with open(d / "state.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    (d / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(d)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)


def test_find_latest_by_step(tmp_path):
    for name, step in [("run_a/checkpoint_2", 20), ("run_a/checkpoint_1", 10), ("run_b/checkpoint_0", 5)]:
        d = tmp_path / name
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": step}))
    assert find_latest_checkpoint(tmp_path) == tmp_path / "run_a/checkpoint_2"
    assert find_latest_checkpoint(tmp_path, "run_b") == tmp_path / "run_b/checkpoint_0"
    assert find_latest_checkpoint(tmp_path / "nothing") is None


def test_reinit_class_layers_on_class_count_change():
    src = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    dst = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 5))
    fresh = dst[1].weight.clone()
    with pytest.raises(CheckpointError, match=r"1\.weight"):
        load_model_state(dst, src.state_dict())
    reinit = load_model_state(dst, src.state_dict(), reinit_class_layers=True)
    assert reinit == ["1.weight", "1.bias"]
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[1].weight, fresh)

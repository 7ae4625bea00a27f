import json
import os
import re

import pytest
import torch
from torch import nn

from pipelines.training.checkpoints import (
    CheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    load_model_state,
    rank_rng_state,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pipelines.training.optim import build_optimizer, build_scheduler
from pipelines.training.train import checkpoint_uri


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


def test_every_ranks_random_state_is_saved_and_each_rank_resumes_with_its_own(tmp_path):
    """rank 1 resumes from rank 1's generator, not rank 0's (they diverge: the samplers draw data-dependent
    counts); a checkpoint of another world size or an older one gives rank 0's; a CUDA state list rides along
    and a CPU-only process restores the CPU part."""
    model, opt, sched = _parts()
    torch.manual_seed(1)
    rank0 = rng_state()
    torch.manual_seed(2)
    rank1 = rng_state()
    save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, scheduler=sched, step=1, epoch=0, batch_in_epoch=1,
                    meta={}, rng_by_rank=[rank0, rank1])
    state = load_checkpoint(tmp_path / "ck")
    assert torch.equal(state.rng, rank0["cpu"])  # what older readers take
    for rank, own in ((0, rank0), (1, rank1), (5, rank0)):
        torch.manual_seed(99)
        set_rng_state(rank_rng_state(state, rank))
        after = torch.rand(3)
        torch.set_rng_state(own["cpu"])
        assert torch.equal(after, torch.rand(3)), rank
    legacy = load_checkpoint(tmp_path / "ck")
    legacy.rng_by_rank = None
    assert torch.equal(rank_rng_state(legacy, 1), rank0["cpu"])
    # a state saved where CUDA was used: the CUDA part is skipped on a machine without that many devices
    set_rng_state({"cpu": rank1["cpu"], "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8})
    assert torch.equal(torch.get_rng_state(), rank1["cpu"])


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)


def _fake_checkpoint(directory, step, state=True):
    """A checkpoint directory as find_latest_checkpoint sees it: meta.json with the step (and a state file)."""
    directory.mkdir(parents=True)
    (directory / "meta.json").write_text(json.dumps({"step": step}))
    if state:
        (directory / "state.pt").write_bytes(b"")


def test_find_latest_by_step(tmp_path):
    for name, step in [("run_a/checkpoint_2", 20), ("run_a/checkpoint_1", 10), ("run_b/checkpoint_0", 5)]:
        _fake_checkpoint(tmp_path / name, step)
    assert find_latest_checkpoint(tmp_path) == str(tmp_path / "run_a/checkpoint_2")
    assert find_latest_checkpoint(str(tmp_path), "run_b") == str(tmp_path / "run_b/checkpoint_0")
    assert find_latest_checkpoint(tmp_path / "nothing") is None


def test_find_latest_skips_refused_checkpoints_and_says_why(tmp_path):
    _fake_checkpoint(tmp_path / "theirs/checkpoint_9", 9)
    _fake_checkpoint(tmp_path / "ours/checkpoint_3", 3)
    (tmp_path / "ours/checkpoint_3/meta.json").write_text(json.dumps({"step": 3, "fingerprint": "ours"}))
    refused: list[str] = []

    def accept(meta):
        return None if meta.get("fingerprint") == "ours" else "other shards"

    assert find_latest_checkpoint(tmp_path, accept=accept, refused=refused) == str(tmp_path / "ours/checkpoint_3")
    assert refused == [f"{tmp_path / 'theirs/checkpoint_9'}: other shards"]
    assert find_latest_checkpoint(tmp_path, accept=lambda meta: "no") is None


def test_find_latest_over_a_file_uri_returns_a_uri(tmp_path):
    # highest step wins wherever it is; names that are not checkpoint_* and directories without the state
    # file (an upload cut short) are not candidates even with a higher step
    _fake_checkpoint(tmp_path / "run_a/checkpoint_000001", 10)
    _fake_checkpoint(tmp_path / "run_a/checkpoint_000003", 30)
    _fake_checkpoint(tmp_path / "run_b/checkpoint_000002", 20)
    _fake_checkpoint(tmp_path / "run_b/checkpoint_000004", 40, state=False)
    _fake_checkpoint(tmp_path / "run_b/other_000005", 50)
    root = f"file://{tmp_path}"
    assert find_latest_checkpoint(root) == f"file://{tmp_path}/run_a/checkpoint_000003"
    assert find_latest_checkpoint(root, "run_b") == f"file://{tmp_path}/run_b/checkpoint_000002"
    assert find_latest_checkpoint(root + "/", "run_b") == f"file://{tmp_path}/run_b/checkpoint_000002"
    assert find_latest_checkpoint(f"{root}/nothing") is None


def test_find_latest_tie_on_step_takes_the_newest(tmp_path):
    _fake_checkpoint(tmp_path / "a/checkpoint_1", 7)
    _fake_checkpoint(tmp_path / "b/checkpoint_1", 7)
    # the newer one listed second: keeping the first found on equal steps would answer a/
    os.utime(tmp_path / "a/checkpoint_1/meta.json", ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    os.utime(tmp_path / "b/checkpoint_1/meta.json", ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    assert find_latest_checkpoint(f"file://{tmp_path}") == f"file://{tmp_path}/b/checkpoint_1"
    os.utime(tmp_path / "a/checkpoint_1/meta.json", ns=(3_000_000_000_000_000_000, 3_000_000_000_000_000_000))
    assert find_latest_checkpoint(f"file://{tmp_path}") == f"file://{tmp_path}/a/checkpoint_1"


def test_load_through_a_file_uri_equals_the_local_load(tmp_path):
    model, opt, sched = _parts()
    meta = {"categories": {"coco_ids": [1, 3]}, "config": {"name": "x"}}
    local = save_checkpoint(tmp_path / "run/checkpoint_000004", model=model, optimizer=opt, scheduler=sched,
                            step=4, epoch=1, batch_in_epoch=2, meta=meta)
    a, b = load_checkpoint(local), load_checkpoint(f"file://{local}")
    assert (b.step, b.epoch, b.batch_in_epoch) == (a.step, a.epoch, a.batch_in_epoch) == (4, 1, 2)
    assert b.meta == a.meta == {**meta, "step": 4, "epoch": 1, "batch_in_epoch": 2}
    assert a.model.keys() == b.model.keys() and all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert torch.equal(b.optimizer["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    assert b.scheduler == a.scheduler and torch.equal(b.rng, a.rng)
    assert read_meta(f"file://{local}") == read_meta(local) == a.meta
    # what train.py hands on after fit: find_latest over the URI storage, then load from its answer
    assert load_checkpoint(find_latest_checkpoint(f"file://{tmp_path}")).step == 4


def test_missing_checkpoint_uri_is_named(tmp_path):
    missing = f"file://{tmp_path}/run/checkpoint_000009"
    with pytest.raises(CheckpointError, match=re.escape(missing) + ": not a checkpoint"):
        load_checkpoint(missing)
    with pytest.raises(CheckpointError, match=re.escape(missing) + ": not a checkpoint"):
        read_meta(missing)
    # meta.json alone (state.pt not there yet) is not a checkpoint either
    _fake_checkpoint(tmp_path / "half", 3, state=False)
    with pytest.raises(CheckpointError, match="half: not a checkpoint"):
        load_checkpoint(f"file://{tmp_path}/half")
    with pytest.raises(CheckpointError, match="nosuchscheme://x/y: cannot open"):
        load_checkpoint("nosuchscheme://x/y")


class _RayLikeCheckpoint:
    """What train.py reads of a ray.train.Checkpoint: `.path`, the path inside the storage's filesystem."""

    def __init__(self, path):
        self.path = path


@pytest.mark.parametrize(
    "storage, path, expected",
    [
        ("/data/ckpt", "/data/ckpt/run/checkpoint_000003", "/data/ckpt/run/checkpoint_000003"),
        ("file:///x", "/x/run/checkpoint_000003", "file:///x/run/checkpoint_000003"),
        ("s3://b/x", "b/x/run/checkpoint_000003", "s3://b/x/run/checkpoint_000003"),
        ("gs://b/x/", "b/x/run/checkpoint_1", "gs://b/x/run/checkpoint_1"),
        # the s3 options a MinIO storage carries must reach whoever reads the checkpoint later
        ("s3://b/x?endpoint_override=localhost:9000", "b/x/r/checkpoint_1",
         "s3://b/x/r/checkpoint_1?endpoint_override=localhost:9000"),
        ("hdfs://namenode:8020/x", "/x/r/checkpoint_1", "hdfs://namenode:8020/x/r/checkpoint_1"),
    ],
)
def test_checkpoint_uri_from_storage(storage, path, expected):
    assert checkpoint_uri(_RayLikeCheckpoint(path), storage) == expected


def test_checkpoint_uri_is_what_pyarrow_opens(tmp_path):
    # Ray's Checkpoint.path for a file:// storage is the path inside LocalFileSystem; the URI built from it opens
    # the same directory again
    from pyarrow import fs as pafs

    filesystem, inner = pafs.FileSystem.from_uri(f"file://{tmp_path}/run/checkpoint_000001")
    uri = checkpoint_uri(_RayLikeCheckpoint(inner), f"file://{tmp_path}")
    assert uri == f"file://{tmp_path}/run/checkpoint_000001"
    assert pafs.FileSystem.from_uri(uri)[1] == inner


def test_model_spec_reads_a_file_uri_checkpoint(tmp_path):
    from mrcnn.config import shapes
    from pipelines.models import model_spec
    from pipelines.training.model_source import ModelSource

    config = shapes()
    categories = {"coco_ids": [1, 3, 7], "names": ["circle", "square", "triangle"]}
    local = save_checkpoint(tmp_path / "ckpt", model=nn.Linear(1, 1), optimizer=None, scheduler=None, step=2,
                            epoch=0, batch_in_epoch=2,
                            meta={"config": config.to_dict(), "categories": categories, "num_classes": 4})
    uri = f"file://{local}"
    spec = model_spec(uri)
    assert spec.source == ModelSource("checkpoint", uri)
    assert spec.config == config and spec.categories == categories and spec.num_classes == 4
    checkpoints = (uri, "s3://b/x/checkpoint_1", str(local), "ckpt/checkpoint_1")
    assert not any(ModelSource.parse(p).kind == "mlflow" for p in checkpoints)
    mlflow_models = ("runs:/0123abcd/model", "models:/mrcnn/3", "models:/mrcnn@prod")
    assert all(ModelSource.parse(p).kind == "mlflow" for p in mlflow_models)
    with pytest.raises(CheckpointError, match=re.escape(f"file://{tmp_path}/none: not a checkpoint")):
        model_spec(f"file://{tmp_path}/none")


def test_reinit_class_layers_on_class_count_change():
    src = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    dst = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 5))
    fresh = dst[1].weight.clone()
    with pytest.raises(CheckpointError, match=r"1\.weight"):
        load_model_state(dst, src.state_dict())
    reinit = load_model_state(dst, src.state_dict(), reinit_class_layers=True)
    assert reinit == ["1.weight", "1.bias"]
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[1].weight, fresh)


def test_find_latest_edge_cases(tmp_path):
    # a meta.json without a step (older writers) ranks below step 0
    _fake_checkpoint(tmp_path / "a/checkpoint_0", 0)
    _fake_checkpoint(tmp_path / "b/checkpoint_9", 9)
    (tmp_path / "b/checkpoint_9/meta.json").write_text("{}")
    assert find_latest_checkpoint(tmp_path) == str(tmp_path / "a/checkpoint_0")
    # an upload cut short, wherever it is listed, hides no other checkpoint
    for name in ("a/checkpoint_7", "c/checkpoint_8", "0/checkpoint_9"):
        _fake_checkpoint(tmp_path / name, 100, state=False)
    _fake_checkpoint(tmp_path / "d/checkpoint_1", 10)
    assert find_latest_checkpoint(tmp_path) == str(tmp_path / "d/checkpoint_1")
    # storage pointing into one checkpoint: nothing under it; a URI storage whose checkpoints are all refused
    assert find_latest_checkpoint(tmp_path / "d/checkpoint_1") is None
    assert find_latest_checkpoint(f"file://{tmp_path}", accept=lambda meta: "refused") is None


def test_an_unreadable_meta_is_named_with_the_storage_and_run(tmp_path):
    _fake_checkpoint(tmp_path / "run_a/checkpoint_1", 1)
    (tmp_path / "run_a/checkpoint_1/meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tmp_path / 'run_a' / 'meta.json'))}: not valid JSON"):
        find_latest_checkpoint(tmp_path, "run_a")

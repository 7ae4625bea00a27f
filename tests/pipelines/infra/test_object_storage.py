"""The stages on object storage: a local S3 server (moto, tests/support/s3.py) on 127.0.0.1 as the peer.

Preprocess writes the shards to the bucket, training checkpoints there and resumes from there, evaluation reads
both; the bucket's contents are listed through boto3, so a stage that wrote elsewhere (or nowhere) fails here.
Everything is addressed by URIs that carry the endpoint (`s3://bucket/key?endpoint_override=...&scheme=http`), as
a cluster reaching MinIO or Ceph would be. Two `TorchTrainer.fit()` runs in all, shared through a fixture.
"""

import json
import math
import os
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from mrcnn.config import shapes
from pipelines.infra.storage import filesystem_for, join_uri, read_bytes
from tests.support.s3 import LocalS3

pytestmark = pytest.mark.slow


def test_join_uri_keeps_a_uris_query_at_the_end():
    assert join_uri("s3://b/x?endpoint_override=h:9&scheme=http", "a", "m.json") == \
        "s3://b/x/a/m.json?endpoint_override=h:9&scheme=http"
    assert join_uri("s3://b/x/", "a") == "s3://b/x/a"
    assert join_uri("/data/odd?name", "a") == "/data/odd?name/a"  # a local path has no query


@pytest.fixture(scope="module")
def s3():
    with LocalS3() as server:
        yield server


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The stages run from an empty working directory: whatever they write locally by mistake shows up there."""
    path = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        yield path


@pytest.fixture(scope="module")
def s3_shards(s3, workdir, synth_dataset, ray_session) -> str:
    from pipelines.data.coco import split_paths
    from pipelines.data.preprocess import preprocess

    splits = [(s, *split_paths(str(synth_dataset), s)) for s in ("train2017", "val2017")]
    manifest = preprocess(shapes(), splits=splits, out=s3.uri("shards"), progress=False, max_workers=2)
    assert manifest == join_uri(s3.uri("shards"), "manifest.json")
    return s3.uri("shards")


def _config():
    c = shapes()
    t = replace(c.train, steps=4, batch_size=2, warmup_steps=2, log_every=1, checkpoint_every=2, lr=0.01)
    return replace(c, train=t)


@pytest.fixture(scope="module")
def s3_training(s3, s3_shards, tmp_path_factory):
    """A run stopped after step 2 of 4, then a second run resuming it, both checkpointing to the bucket."""
    from mlflow.tracking import MlflowClient

    from pipelines.infra.context import RunContext
    from pipelines.infra.tracking import DEFAULT_EXPERIMENT
    from pipelines.training.train import TrainRequest, train

    mlflow_dir = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{mlflow_dir / 'mlflow.db'}"
    # MLflow's artifacts stay local (a SQLite store's default would be ./mlruns, in the working directory)
    MlflowClient(uri).create_experiment(DEFAULT_EXPERIMENT, artifact_location=str(mlflow_dir / "artifacts"))
    base = dict(shards=s3_shards, val_split=None, log_model=False)
    ctx = RunContext(workers=1, use_gpu=False, storage=s3.uri("checkpoints"), tracking_uri=uri)
    first = train(_config(), TrainRequest(**base, run_name="first", stop_at=2), ctx)
    resumed = train(_config(), TrainRequest(**base, run_name="resumed", resume=True), ctx)
    return {"first": first, "resumed": resumed, "tracking_uri": uri}


def test_preprocess_writes_the_shards_to_the_bucket(s3, s3_shards, workdir):
    from pipelines.data.shardset import ShardSet

    keys = s3.keys("shards/")
    shards = ShardSet.open(s3_shards)
    manifest = shards.manifest
    expected = {f"shards/{f}" for split in manifest["splits"].values() for f in split["files"]}
    assert expected and expected <= set(keys)
    assert "shards/manifest.json" in keys
    assert not [k for k in keys if "/.tmp-" in k], keys  # the staging folder is gone
    assert json.loads(read_bytes(join_uri(s3_shards, "manifest.json"))) == manifest

    for name, split in manifest["splits"].items():
        rows = 0
        for uri in shards.uris(name):
            filesystem, path = filesystem_for(uri)
            rows += pq.read_table(path, filesystem=filesystem).num_rows
        assert rows == split["num_images"] > 0, name
    rows = shards.read_rows("val2017", count=2)
    assert len(rows) == 2 and rows[0]["image"]
    assert os.listdir(workdir) == []  # nothing written locally


def test_train_checkpoints_to_the_bucket_and_resumes_from_it(s3, s3_training, workdir):
    from mlflow.tracking import MlflowClient

    from pipelines.training.checkpoints import find_latest_checkpoint, load_checkpoint, read_meta

    first, resumed = s3_training["first"], s3_training["resumed"]
    assert first.checkpoint.startswith("s3://") and resumed.checkpoint.startswith("s3://")
    assert load_checkpoint(first.checkpoint).step == 2
    state = load_checkpoint(resumed.checkpoint)
    assert state.step == 4 and state.scheduler["last_epoch"] == 4
    assert find_latest_checkpoint(s3.uri("checkpoints")) == resumed.checkpoint

    keys = s3.keys("checkpoints/")
    for run, steps in (("first", [2]), ("resumed", [4])):  # the resumed run made no checkpoint at step 2 again
        states = [k for k in keys if k.startswith(f"checkpoints/{run}/checkpoint_") and k.endswith("/state.pt")]
        assert [read_meta(s3.uri(k.rpartition("/")[0]))["step"] for k in states] == steps, keys
    client = MlflowClient(s3_training["tracking_uri"])
    losses = client.get_metric_history(resumed.run_id, "loss")
    assert sorted(m.step for m in losses) == [3, 4]  # it went on from step 2, not from the start
    assert all(math.isfinite(m.value) for m in losses)
    # the final checkpoint, copied from the bucket into the run's artifacts
    assert {a.path for a in client.list_artifacts(resumed.run_id, "checkpoint")} == {
        "checkpoint/state.pt", "checkpoint/meta.json"}
    assert os.listdir(workdir) == []


def test_evaluate_reads_shards_and_checkpoint_from_the_bucket(s3_shards, s3_training, tmp_path):
    from pipelines.evaluation.evaluate import EvaluateRequest, evaluate
    from pipelines.infra.context import RunContext

    result = evaluate(EvaluateRequest(
        shards=s3_shards, model_path=s3_training["resumed"].checkpoint, split="val2017", out=str(tmp_path / "ev"),
        limit=4, pictures=2,
    ), RunContext(tracking_uri=s3_training["tracking_uri"], use_gpu=False))
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics == result.metrics
    for key in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AR100"):
        assert math.isfinite(metrics[key]) and -1.0 <= metrics[key] <= 1.0, key


def test_backbone_weights_and_an_init_checkpoint_load_from_the_bucket(s3, tmp_path):
    """`train --backbone-weights s3://...` and `--init s3://...`: training's `initialise` (what each worker calls)
    reads both from the bucket, and every tensor is the saved one: the backbone's from the weights file (read
    after the checkpoint), every other from the checkpoint."""
    import io

    import torch

    from mrcnn.model import build_model
    from pipelines.infra.storage import write_bytes
    from pipelines.training.checkpoints import save_checkpoint
    from pipelines.training.loop import initialise
    from pipelines.training.plan import WorkerPlan

    config = shapes()
    torch.manual_seed(0)
    source = build_model(config, num_classes=4)
    local = save_checkpoint(tmp_path / "checkpoint_000003", model=source, optimizer=None, scheduler=None, step=3,
                            epoch=0, batch_in_epoch=3,
                            meta={"config": config.to_dict(), "categories": {"categories": []}, "num_classes": 4})
    for name in ("state.pt", "meta.json"):
        write_bytes(s3.uri(f"init/checkpoint_000003/{name}"), (local / name).read_bytes())
    torch.manual_seed(1)
    backbone = {k: v.clone() for k, v in build_model(config, num_classes=4).backbone.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(backbone, buffer)
    write_bytes(s3.uri("weights/resnet.pth"), buffer.getvalue())

    torch.manual_seed(2)
    target = build_model(config, num_classes=4)
    loop = WorkerPlan(config=config, categories={"categories": []}, fingerprint="f", num_classes=4, total_steps=1,
                      steps_per_epoch=1, global_batch=1, model_path=s3.uri("init/checkpoint_000003"),
                      backbone_weights=s3.uri("weights/resnet.pth"))
    messages = initialise(target, loop)
    assert messages == [f"initialised from {s3.uri('init/checkpoint_000003')} (step 3)",
                        f"backbone weights from {s3.uri('weights/resnet.pth')}"]
    saved = source.state_dict()
    for key, value in target.state_dict().items():
        expected = backbone[key.removeprefix("backbone.")] if key.startswith("backbone.") else saved[key]
        assert torch.equal(value, expected), key
    assert any(not torch.equal(backbone[k], saved[f"backbone.{k}"]) for k in backbone)  # two different sources

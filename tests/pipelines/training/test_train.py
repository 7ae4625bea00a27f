"""End-to-end Ray Train runs (real local Ray, real MLflow store, tiny synthetic shards). Few and small:
each `TorchTrainer.fit()` costs tens of seconds of fixed overhead on 2 cores. The trainer, its hooks and the loop's
parts are tested without Ray Train in test_trainer.py and test_loop.py."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from mrcnn.config import shapes
from mrcnn.model import build_model
from pipelines.data.shardset import FingerprintMismatch
from pipelines.infra.context import RunContext
from pipelines.training.checkpoints import load_checkpoint
from pipelines.training.train import TrainRequest, train
from tests.support.fault_drill import FaultDrill
from tests.support.torchvision_reference import randomised_resnet18

pytestmark = pytest.mark.slow


def _config(**train_changes):
    # the first preset's samples (256 RPN anchors, 128 RoIs at 1/3): ten single-image steps of the retuned preset
    # (64 anchors, 64 RoIs at 1/4) are too noisy for "the loss fell" to hold for every data order
    c = shapes()
    c = replace(c, rpn=replace(c.rpn, anchors_per_image=256, pre_nms_topk=1000, post_nms_train=300),
                roi=replace(c.roi, rois_per_image=128, positive_fraction=0.33))
    t = replace(c.train, **{"batch_size": 2, "warmup_steps": 2, "log_every": 2, "checkpoint_every": 2, **train_changes})
    return replace(c, train=t)


def test_two_workers_train_checkpoint_and_log_to_mlflow(synth_shards, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # batch 1 on 2 workers: 5 steps per epoch over the ~10 training images, so 10 steps are 2 epochs (each
    # epoch starts a new Ray Data stream, ~10 s of fixed cost on 2 cores)
    # train.cache_data as the demo runs: the splits decoded once into the object store, not streamed per epoch
    # val_every=1: the validation loss after each of the 2 epochs, through train() (the shapes preset has 0)
    # train.export_onnx: the logged model also holds its ONNX export
    config = _config(steps=10, checkpoint_every=5, lr=0.01, batch_size=1, cache_data=True, val_every=1,
                     export_onnx=True)
    result = train(
        config,
        TrainRequest(shards=synth_shards, run_name="two-workers", cpus_per_worker=1.0, register="mrcnn-shapes-test"),
        RunContext(workers=2, use_gpu=False, storage=str(tmp_path / "ckpt"), tracking_uri=uri),
    )
    state = load_checkpoint(result.checkpoint)
    assert state.step == 10 and state.meta["num_classes"] == 4
    assert result.best_checkpoint is not None

    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    params = run.data.params
    assert params["workers"] == "2" and params["global_batch"] == "2" and params["train.lr"] == "0.01"
    assert params["dataset_fingerprint"] == config.fingerprint() and params["code_version"]
    losses = [m.value for m in client.get_metric_history(result.run_id, "loss")]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), f"loss did not fall: {losses}"
    for key in ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask", "lr", "images_per_s", "val_loss",
                "step_s", "data_wait_s", "input_bound_fraction"):
        assert client.get_metric_history(result.run_id, key), key
    for key in ("data_wait_s", "input_bound_fraction"):  # the time waited for data: measured, never negative
        assert all(0 <= m.value for m in client.get_metric_history(result.run_id, key)), key
    assert all(m.value <= 1 for m in client.get_metric_history(result.run_id, "input_bound_fraction"))
    assert run.data.tags["amp"] == "off"  # train.amp=auto on CPU workers
    # the node's system metrics, sampled by one of the two workers on it (local rank 0): one value a step, no
    # node label on a one-node run
    cpu = client.get_metric_history(result.run_id, "system/cpu_utilization_percentage")
    assert cpu and len({m.step for m in cpu}) == len(cpu)
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("system/node")]
    assert "checkpoint" in {a.path for a in client.list_artifacts(result.run_id)}
    # MLflow 3 keeps the model as a logged model linked to the run
    assert [m.name for m in client.search_logged_models([run.info.experiment_id])] == ["model"]

    # the logged model loads with MLflow and predicts
    import mlflow.pytorch
    import ray.data

    from pipelines.data.loader import ShardBatchDecoder, decoder_for

    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model", map_location="cpu")
    rows = ray.data.read_parquet(f"{synth_shards}/val2017").take_batch(2, batch_format="numpy")
    batch = ShardBatchDecoder(**decoder_for(config, model.anchors.shape[0]))(rows)
    with torch.no_grad():
        detections = model.eval()({k: torch.as_tensor(v) for k, v in batch.items()})
    assert len(detections) == 2 and set(detections[0]) >= {"boxes", "class_ids", "scores", "masks"}
    # train.export_onnx: model.onnx among the model's files, giving the logged model's detections in onnxruntime
    from pipelines.data.coco_results import run_model
    from pipelines.evaluation.onnx_export import OnnxModel

    files = Path(mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/model", dst_path=str(tmp_path / "dl")))
    [onnx_file] = files.rglob("model.onnx")
    exported = OnnxModel(onnx_file)
    assert exported.meta.source == f"runs:/{result.run_id}/model" and exported.meta.config == config
    eager = run_model(model, batch["images"], batch["windows"], torch.device("cpu"),
                      max_detections=config.detection.max_detections)
    ours = exported(batch["images"], batch["windows"])
    np.testing.assert_array_equal(ours["det_count"], eager["det_count"])
    np.testing.assert_allclose(ours["det_scores"], eager["det_scores"], rtol=0, atol=1e-4)
    assert len(client.get_metric_history(result.run_id, "val_loss")) == 2  # one per epoch (val_every=1)

    # evaluate and predict take MLflow model URIs: runs:/ (evaluate, in Ray actors) and models:/ (predict)
    from pipelines.data.coco import read_split
    from pipelines.data.shardset import read_manifest
    from pipelines.evaluation.evaluate import EvaluateRequest, evaluate
    from pipelines.evaluation.predict import predict_images

    evaluated = evaluate(EvaluateRequest(shards=synth_shards, model_path=f"runs:/{result.run_id}/model", limit=2,
                                         out=str(tmp_path / "eval")), RunContext(tracking_uri=uri, use_gpu=False))
    assert -1.0 <= evaluated.metrics["segm/AP"] <= 1.0 and (tmp_path / "eval" / "metrics.json").exists()
    # `train --register`: the final model is version 1 of the name, alias champion
    version = client.get_model_version_by_alias("mrcnn-shapes-test", "champion").version
    assert int(version) == 1 and client.get_model_version("mrcnn-shapes-test", version).run_id == result.run_id
    split = read_manifest(synth_shards)["splits"]["val2017"]
    image = read_split(split["annotations"], split["images_root"]).records[0]["path"]
    predicted = predict_images([image], "models:/mrcnn-shapes-test@champion", tmp_path / "predicted",
                               device="cpu", threshold=0.0, tracking_uri=uri)
    assert len(predicted.images) == 1 and (tmp_path / "predicted" / "predictions.json").exists()


def test_resume_and_fault_recovery_equal_an_uninterrupted_run(synth_shards, tmp_path):
    config = _config(steps=8, lr=0.01)  # streamed from the shards every epoch (the two-worker test caches)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def run(storage: str, after_step=None, **kw):
        ctx = RunContext(workers=1, use_gpu=False, storage=str(tmp_path / storage), tracking_uri=uri)
        base = dict(shards=synth_shards, val_split=None, log_model=False)
        return train(config, TrainRequest(**{**base, **kw}), ctx, after_step=after_step)

    straight = run("straight", run_name="straight")
    first = run("sliced", run_name="first-half", stop_at=4)
    assert load_checkpoint(first.checkpoint).step == 4
    marker = tmp_path / "fault-marker"
    resumed = run("sliced", run_name="second-half", resume=True, after_step=FaultDrill(7, str(marker)))
    assert marker.read_text().startswith("killed at step 7")  # the worker really died once

    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a.step == b.step == 8
    for key, value in a.model.items():
        assert torch.allclose(value.float(), b.model[key].float(), atol=1e-5), key
    assert a.scheduler["last_epoch"] == b.scheduler["last_epoch"] == 8


def test_shards_of_another_config_are_refused(synth_shards, tmp_path):
    other = shapes().override(["image.max_dim=256", "image.min_dim=256"])
    with pytest.raises(FingerprintMismatch, match=r"image\.max_dim: 128 != 256"):
        train(other, TrainRequest(shards=synth_shards), RunContext(workers=1, storage=str(tmp_path)))
    assert not Path(tmp_path / "mlflow.db").exists()


def test_resume_refuses_a_checkpoint_of_another_config_or_other_shards(synth_shards, tmp_path):
    """--resume used to take the highest-step checkpoint of any run under --storage. A stranger's checkpoint (other
    config, other shards) is refused with the reason, before any MLflow run or Ray Train work."""
    from mrcnn.model import build_model
    from pipelines.data.shardset import read_manifest
    from pipelines.training.checkpoints import save_checkpoint

    config = _config(steps=8, lr=0.01)
    manifest = read_manifest(synth_shards)
    model = build_model(config, num_classes=4)
    meta = {"config": config.to_dict(), "categories": manifest["categories"], "num_classes": 4,
            "fingerprint": manifest["fingerprint"]}
    storage = tmp_path / "ckpt"
    other_lr = replace(config, train=replace(config.train, lr=0.02))
    save_checkpoint(storage / "a/checkpoint_000009", model=model, optimizer=None, scheduler=None, step=9, epoch=0,
                    batch_in_epoch=0, meta={**meta, "config": other_lr.to_dict()})
    save_checkpoint(storage / "b/checkpoint_000007", model=model, optimizer=None, scheduler=None, step=7, epoch=0,
                    batch_in_epoch=0, meta={**meta, "fingerprint": "0123456789abcdef"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    request = TrainRequest(shards=synth_shards, val_split=None, log_model=False, resume=True)
    with pytest.raises(ValueError, match=r"no checkpoint to resume") as refused:
        train(config, request, RunContext(workers=1, use_gpu=False, storage=str(storage), tracking_uri=uri))
    message = str(refused.value)
    assert "trained with another config: train.lr: 0.02 != 0.01" in message
    assert "made from other shards (fingerprint '0123456789abcdef'" in message
    assert not (tmp_path / "mlflow.db").exists()

    # the run's own checkpoint, beside the strangers' (even with a lower step), is the one taken
    save_checkpoint(storage / "c/checkpoint_000004", model=model, optimizer=None, scheduler=None, step=4, epoch=0,
                    batch_in_epoch=0, meta=meta)
    from pipelines.training.checkpoints import find_latest_checkpoint
    from pipelines.training.train import resume_refusal

    taken = find_latest_checkpoint(storage, accept=lambda m: resume_refusal(m, config, manifest["fingerprint"]))
    assert taken == str(storage / "c/checkpoint_000004")


def test_imagenet_resnet_backbone_weights_end_to_end(synth_shards, tmp_path):
    """`--backbone-weights FILE`, a torchvision ResNet-18 state dict (seeded, with BatchNorm statistics that a load
    skipping them would show), through train(): with `--layers heads` the backbone does not train, so the final
    checkpoint's backbone is exactly the file's, while the heads trained."""

    resnet = randomised_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    result = train(
        _config(steps=2, lr=0.01),
        TrainRequest(shards=synth_shards, val_split=None, log_model=False, backbone_weights=str(path),
                     layers="heads", run_name="imagenet-backbone"),
        RunContext(workers=1, use_gpu=False, storage=str(tmp_path / "ckpt"),
                   tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"),
    )
    state = load_checkpoint(result.checkpoint)
    assert state.step == 2
    expected = {f"backbone.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    assert len(expected) == 120 and all(torch.equal(state.model[k], v) for k, v in expected.items())
    torch.manual_seed(0)  # the loop's seed: the heads as they were before the two steps
    initial = build_model(_config(), num_classes=4).state_dict()
    assert not torch.equal(state.model["box_head.fc1.weight"], initial["box_head.fc1.weight"])


def test_cpus_per_worker_defaults_to_two_on_gpus_and_one_on_cpus():
    from pipelines.training.train import GPU_WORKER_CPUS, default_cpus_per_worker

    assert default_cpus_per_worker(None, use_gpu=True) == GPU_WORKER_CPUS == 2
    assert default_cpus_per_worker(None, use_gpu=False) == 1
    assert default_cpus_per_worker(3, use_gpu=True) == 3  # what was asked for wins
    with pytest.raises(ValueError, match="--cpus-per-worker 0"):
        default_cpus_per_worker(0, use_gpu=False)

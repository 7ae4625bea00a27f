"""The run context: what every stage shares, one frozen value, importable without Ray and MLflow."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.infra.context import RunContext

REPO = Path(__file__).resolve().parents[3]


def test_a_context_is_frozen_and_a_stage_gets_its_own_by_replace():
    ctx = RunContext(address="ray://head:10001", experiment="e", workers=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.workers = 3  # type: ignore[misc]
    stage = dataclasses.replace(ctx, parent_run_id="p", tags={"k": "v"})
    assert (stage.address, stage.experiment, stage.workers, stage.parent_run_id) == ("ray://head:10001", "e", 2, "p")
    assert ctx.parent_run_id is None and ctx.tags == {}


def test_the_compared_settings_are_gpu_use_and_workers():
    assert RunContext(workers=4, use_gpu=True, storage="s3://b/c").compared() == {"use_gpu": True, "workers": 4}


def test_an_explicit_gpu_choice_needs_no_cluster():
    assert RunContext(use_gpu=False).gpus() is False and RunContext(use_gpu=True).gpus() is True


def test_the_tracking_store_resolves_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    assert RunContext().mlflow_uri() == f"sqlite:///{tmp_path / 'env.db'}"
    assert RunContext(tracking_uri="http://mlflow:5000").mlflow_uri() == "http://mlflow:5000"


def test_a_stages_run_nests_under_the_parent_with_the_contexts_tags(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = RunContext(tracking_uri=uri, experiment="ctx").create_run("pipeline", {"stage": "pipeline"})
    ctx = RunContext(tracking_uri=uri, experiment="ctx", parent_run_id=parent, tags={"preprocess_run_id": "r"})
    run = MlflowClient(uri).get_run(ctx.create_run("train", {"stage": "train"}))
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["preprocess_run_id"] == "r"
    assert run.data.tags["stage"] == "train" and run.info.run_name == "train"
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == "ctx"


def test_importable_without_ray_and_mlflow():
    code = """
import sys
for blocked in ("ray", "mlflow"):
    sys.modules[blocked] = None
from pipelines.infra.context import RunContext
print(RunContext(use_gpu=False).gpus())
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]

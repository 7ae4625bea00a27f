"""The pipeline against a real `mlflow server` over HTTP (artifacts proxied by the server), and the MLflow UI
rendered in headless Chromium showing the run.

One server and one small pipeline run (preprocess -> train -> evaluate on the synthetic dataset, `shapes`
preset, a handful of train steps) are shared by every test here; the Ray workers log to the server through
the `http://` tracking URI, so nothing reaches the server's SQLite file but the server itself.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mrcnn.config import shapes
from pipelines.dag import DagResult, PipelineRequest, run_pipeline
from pipelines.infra.context import RunContext
from tests.support.mlflow_ui import chromium, render, visible_text

pytestmark = pytest.mark.slow
TRAIN_STEPS = 5  # one epoch of the 10 non-empty training images at batch 2: one validation, one Ray Data stream


@pytest.fixture(scope="module")
def pipeline(mlflow_server, ray_session, synth_dataset, tmp_path_factory) -> DagResult:
    """One small pipeline run logging to the server."""
    mlflow_server.wait_ready()
    config = shapes()
    config = replace(
        config,
        train=replace(config.train, steps=TRAIN_STEPS, batch_size=2, warmup_steps=2, log_every=1,
                      checkpoint_every=TRAIN_STEPS, lr=0.01),
    )
    work = tmp_path_factory.mktemp("pipeline_http")
    return run_pipeline(
        config,
        PipelineRequest(dataset=str(synth_dataset), work_dir=str(work)),
        RunContext(workers=1, use_gpu=False, tracking_uri=mlflow_server.url),
    )


@pytest.fixture(scope="module")
def client(mlflow_server) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server.url)


def _stage_runs(client: MlflowClient, pipeline: DagResult) -> dict:
    parent = client.get_run(pipeline.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{pipeline.parent_run_id}'"
    )
    return {r.data.tags["stage"]: r for r in children}


def test_parent_and_one_nested_run_per_stage(pipeline, client):
    assert pipeline.ran == ["preprocess", "train", "evaluate"]
    parent = client.get_run(pipeline.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "pipeline-shapes"
    assert parent.data.tags["stage"] == "pipeline"
    # the runs live in the server's store: it hands out proxied artifact locations
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")
    runs = _stage_runs(client, pipeline)
    assert sorted(runs) == ["evaluate", "preprocess", "train"]
    for stage, run in runs.items():
        assert run.info.status == "FINISHED", stage
        assert run.info.run_id == pipeline.outputs[stage]["run_id"], stage
        assert run.info.experiment_id == parent.info.experiment_id
    assert runs["train"].data.tags["preprocess_run_id"] == runs["preprocess"].info.run_id
    # the parent records each stage's key and output folder
    assert {f"{s}.key" for s in runs} <= set(parent.data.params)


def test_train_run_has_per_step_losses_and_the_model(pipeline, client, capsys, tmp_path):
    run = _stage_runs(client, pipeline)["train"]
    history = client.get_metric_history(run.info.run_id, "loss")
    with capsys.disabled():
        print(f"\n[mlflow server] train losses by step: {[(m.step, round(m.value, 3)) for m in history]}")
    assert [m.step for m in history] == list(range(1, TRAIN_STEPS + 1))  # log_every=1, from the Ray worker
    assert all(0 < m.value < 100 for m in history)
    for key in ("loss_rpn_cls", "loss_mask", "lr", "val_loss"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert run.data.params["total_steps"] == str(TRAIN_STEPS)
    assert "checkpoint" in {a.path for a in client.list_artifacts(run.info.run_id)}
    checkpoint_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert "meta.json" in checkpoint_files, checkpoint_files
    meta_file = client.download_artifacts(run.info.run_id, "checkpoint/meta.json", str(tmp_path))
    meta = json.loads(Path(meta_file).read_text())
    # the final checkpoint, with background + the synthetic dataset's three shapes
    assert meta["step"] == TRAIN_STEPS and meta["num_classes"] == 4
    # MLflow 3 keeps the model as a logged model linked to the run, its files on the server too
    models = client.search_logged_models([run.info.experiment_id])
    assert [m.name for m in models] == ["model"] and models[0].source_run_id == run.info.run_id
    assert models[0].artifact_location.startswith("mlflow-artifacts:/")


def test_evaluate_run_metrics_and_artifacts_download_through_the_server(
    pipeline, client, mlflow_server, tmp_path, capsys
):
    run = _stage_runs(client, pipeline)["evaluate"]
    metrics = run.data.metrics
    with capsys.disabled():
        print(f"\n[mlflow server] evaluate: segm AP {metrics['segm_AP']:.3f} bbox AP {metrics['bbox_AP']:.3f}")
    for key in ("segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics.get(key))
    assert metrics["segm_AP"] == pytest.approx(pipeline.outputs["evaluate"]["metrics"]["segm/AP"])

    listed = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"metrics.json", "detections.json", "stats.txt", "pr_curve_segm.png", "pr_curve_bbox.png"} <= listed

    # a round trip through the server's artifact proxy: what the stage wrote is what comes back
    local = client.download_artifacts(run.info.run_id, "evaluation/metrics.json", str(tmp_path))
    written = Path(pipeline.outputs["evaluate"]["out"]) / "metrics.json"
    assert json.loads(Path(local).read_text()) == json.loads(written.read_text())
    png = Path(client.download_artifacts(run.info.run_id, "evaluation/pr_curve_segm.png", str(tmp_path)))
    assert png.read_bytes() == (written.parent / "pr_curve_segm.png").read_bytes()
    # ...and it went through the server: its artifacts folder holds the file
    assert len(list((mlflow_server.root / "artifacts").rglob("pr_curve_segm.png"))) == 1


# ------------------------------------------------------------------------------------------ the UI

def test_ui_experiment_page_shows_the_pipeline_run(pipeline, client, mlflow_server, tmp_path):
    browser = chromium()
    parent = client.get_run(pipeline.parent_run_id)
    # MLflow 3's UI opens an experiment in its "GenAI" workflow (a traces overview, no runs) unless told
    # otherwise; `workflowType=machine_learning` is what its "Model training" switch puts in the URL
    url = f"{mlflow_server.url}/#/experiments/{parent.info.experiment_id}?workflowType=machine_learning"

    dom = render(browser, url, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    (tmp_path / "experiment.html").write_text(dom.stdout)
    assert parent.info.run_name in dom.stdout, f"run name not in the rendered page ({len(dom.stdout)} chars)"
    assert f"/runs/{parent.info.run_id}" in dom.stdout  # the runs table links the name to this very run

    shot = tmp_path / "ui.png"
    rendered = render(browser, url, tmp_path, f"--screenshot={shot}", "--window-size=1400,900")
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1400, 900)
        image.load()
        # a real render, not a blank page: the UI paints more than a couple of colours
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20
    client.log_artifact(pipeline.parent_run_id, str(shot), "ui")
    assert "ui/ui.png" in {a.path for a in client.list_artifacts(pipeline.parent_run_id, "ui")}


# ------------------------------------------------------------------------------------------ runs that compare
def _pipeline_like_stages(segm_ap: float, rate: float) -> list:
    """Stand-ins for the three stages whose outputs have the real stages' shape (what `evaluate_headline` and
    `train_headline` read), so that `run_dag` writes the parent run exactly as for a real pipeline, in seconds."""
    from pipelines.dag import Stage, evaluate_headline, train_headline

    metrics = {"segm/AP": segm_ap, "segm/AP50": segm_ap + 0.2, "bbox/AP": segm_ap - 0.05, "bbox/AP50": segm_ap + 0.1}
    return [
        Stage("preprocess", {"segm_ap": segm_ap}, lambda out, up, parent: {"shards": out}),
        Stage("train", {}, lambda out, up, parent: {"images_per_s": rate}, headline=train_headline),
        Stage("evaluate", {}, lambda out, up, parent: {"metrics": metrics}, headline=evaluate_headline),
    ]


COMPARED = ((0.01, 0.412, 3.5), (0.02, 0.653, 4.25))  # (train.lr, segm AP, images/s) of the two pipelines


@pytest.fixture(scope="module")
def compared_pipelines(mlflow_server, client, ray_session, tmp_path_factory):
    """Two pipeline runs with different settings, through the real `run_dag` and `pipeline_params`:
    (experiment name, their parent runs)."""
    from pipelines.dag import pipeline_params, run_dag

    mlflow_server.wait_ready()
    experiment, work = "compare-pipelines", tmp_path_factory.mktemp("compare")
    parents = []
    for lr, segm_ap, rate in COMPARED:
        config = shapes().override([f"train.lr={lr}"])
        ctx = RunContext(workers=2, tracking_uri=mlflow_server.url, experiment=experiment)
        params = pipeline_params(config, PipelineRequest(dataset="data/shapes"), ctx)
        result = run_dag(_pipeline_like_stages(segm_ap, rate), work / f"work-{lr}", ctx,
                         run_name=f"pipeline-lr{lr}", params=params)
        parents.append(client.get_run(result.parent_run_id))
    return experiment, parents


def test_two_pipelines_carry_their_settings_and_headline_numbers(compared_pipelines, client):
    """Browser-free, so it runs without Chromium: the parent runs carry the settings as params and the headline
    numbers as metrics (what the runs table and the compare page show)."""
    from pipelines.infra import tracking

    _, parents = compared_pipelines
    for parent, (lr, segm_ap, rate) in zip(parents, COMPARED, strict=True):
        m = parent.data.metrics
        assert m["segm_AP"] == segm_ap and m["segm_AP50"] == pytest.approx(segm_ap + 0.2)
        assert m["bbox_AP"] == pytest.approx(segm_ap - 0.05) and m["train_images_per_s"] == rate
        assert {"time_preprocess_s", "time_train_s", "time_evaluate_s", "time_total_s"} <= set(m)
        assert set(tracking.RUNS_TABLE_METRICS) <= set(m)  # every column of the shared view has its numbers
        assert parent.data.params["train.lr"] == str(lr) and parent.data.params["pipeline.workers"] == "2"
    experiment_id = parents[0].info.experiment_id
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_two_pipelines_compare_in_the_runs_table_and_the_compare_page(compared_pipelines, mlflow_server, client,
                                                                      tmp_path):
    """The runs table (model-training view) lists both, and MLflow's compare page renders their params and segm AP
    side by side (its screenshot kept as `ui/compare.png` in the first run's artifacts)."""
    from pipelines.infra import tracking

    browser = chromium()
    experiment, parents = compared_pipelines
    experiment_id = parents[0].info.experiment_id
    # the address the demo prints: the runs table in our shared view, the headline metrics as columns
    table = render(browser, tracking.ui_url(mlflow_server.url, experiment), tmp_path, "--dump-dom",
                    "--window-size=2000,1000")
    assert table.returncode == 0, table.stderr[-2000:]
    for parent in parents:
        assert parent.info.run_name in table.stdout and f"/runs/{parent.info.run_id}" in table.stdout
    cells = " ".join(visible_text(table.stdout).split())
    assert "segm_AP" in cells and "0.412" in cells and "0.653" in cells, cells[:3000]

    ids = json.dumps([p.info.run_id for p in parents], separators=(",", ":"))
    compare = f"{mlflow_server.url}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment_id])}"
    dom = render(browser, compare, tmp_path, "--dump-dom", "--window-size=1600,1400")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = " ".join(visible_text(dom.stdout).split())
    assert "Comparing 2 Runs" in text, text[:2000]
    # the params and metrics sections list each key once with the two runs' values after it, in run order
    assert "train.lr 0.01 0.02" in text and "pipeline.workers 2 2" in text, text[:3000]
    assert "0.412 0.653" in text and "segm_AP" in text, text[:3000]
    shot = tmp_path / "compare.png"
    rendered = render(browser, compare, tmp_path, f"--screenshot={shot}", "--window-size=1600,1400")
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        image.load()
        assert image.size == (1600, 1400) and len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20
    if os.environ.get("TEST_ARTIFACTS_DIR"):  # CI keeps the picture (.ci/run sets it)
        Path(os.environ["TEST_ARTIFACTS_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["TEST_ARTIFACTS_DIR"]) / "mlflow_compare.png")
    client.log_artifact(parents[0].info.run_id, str(shot), "ui")
    assert "ui/compare.png" in {a.path for a in client.list_artifacts(parents[0].info.run_id, "ui")}



"""A sweep's runs in the MLflow UI: three trials nested under the sweep's run, with their sampled values and their
metric, in the runs table's view of the sweep, against a real `mlflow server` and rendered in headless Chromium.

The runs are written by the sweep's own MLflow functions (`start_parent_run`, `trial_run`, `finish_sweep`) and,
for what `train()` logs in a trial, by the same tracking calls (its config as params, val_loss per epoch); no
Ray sweep: the test is of the view (tests/pipelines/training/test_tune.py runs a real one)."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import replace

import pytest

from mrcnn.config import shapes
from pipelines.infra import tracking
from pipelines.infra.context import RunContext
from pipelines.training.search_space import parse_searches, trial_config
from pipelines.training.tune import TuneRequest, finish_sweep, start_parent_run, trial_run, view_key
from tests.support.mlflow_ui import chromium, render, visible_text

pytestmark = pytest.mark.slow

EXPERIMENT = "tune-view"
# (trial, train.lr, val_loss after each epoch): the second stopped by ASHA after its first epoch
TRIALS = (("0a1b2_00000", 0.02, (1.812, 1.437)), ("0a1b2_00001", 0.16, (3051.5,)),
          ("0a1b2_00002", 0.01, (1.938, 1.562)))


@pytest.fixture(scope="module")
def sweep(mlflow_server) -> tuple[str, dict[str, str]]:
    """The sweep `sw-view` of TRIALS logged to the server: (parent run id, {trial: its run id})."""
    mlflow_server.wait_ready()
    uri = mlflow_server.url
    ctx = RunContext(tracking_uri=uri, experiment=EXPERIMENT, workers=1)
    request = TuneRequest(shards="shards", searches=("train.lr=grid(0.02, 0.16, 0.01)",), name="sw-view")
    specs = parse_searches(request.searches, shapes())
    parent = start_parent_run(ctx, "sw-view", specs, request, concurrent=1, max_epochs=2)
    trials, rows = replace(ctx, parent_run_id=parent), []
    for trial, lr, losses in TRIALS:
        run_id, restarted = trial_run(trials, "sw-view", trial, f"run_trial_{trial}", {"train.lr": lr})
        assert not restarted
        tracking.log_params(uri, run_id, trial_config(shapes(), {"train.lr": lr}).flat())  # as train() does
        for epoch, loss in enumerate(losses, start=1):
            tracking.log_metrics(uri, run_id, {"val_loss": loss}, step=5 * epoch)
        rows.append({"trial": trial, "train.lr": lr, "val_loss": losses[-1], "epoch": len(losses), "step": 5 * len(
            losses), "stopped_early": len(losses) < 2, "error": None, "run_id": run_id})
    finish_sweep(trials, parent, rows, specs, metric="val_loss")
    return parent, {row["trial"]: row["run_id"] for row in rows}


def test_the_runs_table_gets_the_three_trials_with_their_values_and_metric(mlflow_server, sweep):
    """Browser-free, so it runs without Chromium: the runs search the UI's table sends (`ajax-api`, the
    experiment's runs) gives the sweep and its three nested trials with `train.lr` and `val_loss`, and the
    experiment holds the sweep's view with those columns."""
    parent, runs = sweep
    experiment_id = tracking.ensure_experiment(mlflow_server.url, EXPERIMENT)
    body = json.dumps({"experiment_ids": [experiment_id], "max_results": 100, "run_view_type": "ACTIVE_ONLY"})
    request = urllib.request.Request(f"{mlflow_server.url}/ajax-api/2.0/mlflow/runs/search", data=body.encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        found = json.loads(response.read())["runs"]
    by_id = {r["info"]["run_id"]: r for r in found}
    assert set(by_id) == {parent, *runs.values()}
    for trial, lr, losses in TRIALS:
        data = by_id[runs[trial]]["data"]
        tags, params = {t["key"]: t["value"] for t in data["tags"]}, {p["key"]: p["value"] for p in data["params"]}
        assert tags["mlflow.parentRunId"] == parent and tags["tune.trial_id"] == trial
        assert params["train.lr"] == params["sampled.train.lr"] == str(lr)
        assert {m["key"]: m["value"] for m in data["metrics"]}["val_loss"] == losses[-1]
        assert tags["tune.stopped_early"] == str(len(losses) < 2).lower()
    view = json.loads(tracking._client(mlflow_server.url).get_experiment(experiment_id).tags[
        f"mlflow.sharedViewState.{view_key('sw-view')}"])
    assert view == {"selectedColumns": ["params.`train.lr`", "metrics.`val_loss`"],
                    "searchFilter": f"tags.`mlflow.parentRunId` = '{parent}'", "orderByKey": "metrics.`val_loss`",
                    "orderByAsc": True}


def test_the_sweeps_view_shows_three_nested_trials_with_their_values_and_metric(mlflow_server, sweep, tmp_path):
    """The address `mrcnn-cli tune` prints: the runs table in the sweep's view lists the three trial runs (their
    names link to them) with their lr and their last val_loss in the table's cells."""
    browser = chromium()
    _, runs = sweep
    url = tracking.ui_url(mlflow_server.url, EXPERIMENT, view=view_key("sw-view"))
    table = render(browser, url, tmp_path, "--dump-dom", "--window-size=2000,1000")
    assert table.returncode == 0, table.stderr[-2000:]
    (tmp_path / "sweep.html").write_text(table.stdout)
    cells = " ".join(visible_text(table.stdout).split())
    assert "3 matching runs" in cells and "train.lr" in cells and "val_loss" in cells, cells[:3000]
    # the rows by val_loss, best first (the names, then the pinned columns' cells in the same order)
    ranked = sorted(TRIALS, key=lambda t: t[2][-1])
    names = " ".join(f"run_trial_{trial}" for trial, _, _ in ranked)
    assert " ".join(w for w in cells.split() if w.startswith("run_trial_")) == names, cells[:3000]
    values = [f"{losses[-1]:g} {lr:g}" for _, lr, losses in ranked]
    assert all(v in cells for v in values) and cells.index(values[0]) < cells.index(values[1]), cells[:3000]
    for trial, _, _ in TRIALS:
        assert f"/runs/{runs[trial]}" in table.stdout  # each name links to its run

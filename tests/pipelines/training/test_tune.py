"""`mrcnn-cli tune`: one small real sweep (local Ray of the session, real SQLite MLflow store, the synthetic shards)
and the checks that refuse a sweep before Ray starts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mrcnn.config import shapes
from pipelines.data.errors import InputError
from pipelines.infra.context import RunContext
from pipelines.training.checkpoints import load_checkpoint
from pipelines.training.search_space import SearchSpecError
from pipelines.training.tune import TuneRequest, check_request, format_table, max_concurrent, sweep_config, tune


def test_bad_specs_are_refused_before_ray_starts(tmp_path):
    """The context points at no Ray (port 1) and the shards do not exist: only a refusal before both is a
    SearchSpecError (reaching Ray or the shards would raise something else)."""
    ctx = RunContext(address="127.0.0.1:1", storage=str(tmp_path), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    for bad, words in (("train.lr=uniform(-1,0.1)", "'train.lr': -1.0 is out of range"),
                       ("train.nope=choice(1)", "unknown config key 'train.nope'"),
                       ("train.lr=loguniform(1e-4)", "loguniform takes two numbers")):
        with pytest.raises(SearchSpecError, match=words):
            tune(shapes(), TuneRequest(shards=str(tmp_path / "none"), searches=(bad,)), ctx)
    assert not (tmp_path / "m.db").exists()  # no MLflow run either


@pytest.mark.slow
def test_a_sweep_stops_the_losing_trial_early_and_logs_every_trial_to_mlflow(synth_shards, tmp_path):
    """Two trials, one built to lose: run one at a time, the good one first, ASHA (grace period 1 epoch, reduction
    factor 2, 2 epochs) keeps the good one to the end and stops the other at its first rung, where its validation
    loss is the worse of the two. The loser's lr is too large (0.16 per 16 images diverges here: val_loss in the
    thousands after an epoch), not too small: after 5 steps a tiny lr's validation loss (3.89, the untrained one)
    was not reliably above lr 0.02's."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = shapes()
    # 10 training images (2 of the 12 have no objects) at batch 2 on one worker: 5 steps an epoch; reports at
    # each epoch's end only
    config = replace(config, train=replace(config.train, epochs=2, steps=0, batch_size=2, warmup_steps=1,
                                           checkpoint_every=100, log_every=3, cache_data=True))
    request = TuneRequest(shards=synth_shards, searches=("train.lr=grid(0.02, 0.16)",), scheduler="asha",
                          grace_period=1, max_concurrent=1, name="sweep")
    ctx = RunContext(workers=1, use_gpu=False, storage=str(tmp_path / "tune"), tracking_uri=uri)
    result = tune(config, request, ctx)

    rows = {row["train.lr"]: row for row in result.rows}
    assert set(rows) == {0.02, 0.16}, result.rows
    good, bad = rows[0.02], rows[0.16]
    assert (good["step"], good["epoch"], good["stopped_early"]) == (10, 2, False), good
    assert (bad["step"], bad["epoch"], bad["stopped_early"]) == (5, 1, True), bad
    assert result.best["trial"] == good["trial"]
    assert load_checkpoint(good["checkpoint"]).step == 10  # the best trial's latest checkpoint
    table = format_table(result.rows, ["train.lr"], "val_loss")
    assert "stopped early" in table and "finished" in table and len(table.splitlines()) == 3

    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["search.train.lr"] == "grid(0.02, 0.16)"
    assert parent.data.params["scheduler"] == "asha" and parent.data.params["best.train.lr"] == "0.02"
    assert parent.data.metrics["val_loss"] == pytest.approx(good["val_loss"])
    assert parent.data.tags["best_run_id"] == good["run_id"] and parent.info.status == "FINISHED"
    nested = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert sorted(r.info.run_id for r in nested) == sorted([good["run_id"], bad["run_id"]])  # one run a trial
    runs = {r.info.run_id: r for r in nested}
    for row, epochs, status in ((good, 2, "FINISHED"), (bad, 1, "KILLED")):
        run = runs[row["run_id"]]
        assert run.data.params["train.lr"] == str(row["train.lr"]) == run.data.params["sampled.train.lr"]
        assert run.info.status == status
        assert run.data.tags["tune.stopped_early"] == str(row["stopped_early"]).lower()
        assert run.data.tags["tune.stopped_at_epoch"] == str(epochs)
        assert len(client.get_metric_history(row["run_id"], "val_loss")) == epochs  # one a epoch
    assert bad["val_loss"] > good["val_loss"]
    view = client.get_experiment(parent.info.experiment_id).tags["mlflow.sharedViewState.tune-sweep"]
    assert "params.`train.lr`" in view and "metrics.`val_loss`" in view


@pytest.mark.parametrize(("changes", "words"), [
    ({"scheduler": "hyperband"}, "--scheduler 'hyperband': one of asha, fifo"),
    ({"metric": "segm_AP"}, "--metric 'segm_AP': one of val_loss (segm_AP is not supported yet)"),
    ({"samples": 0}, "--samples 0: must be at least 1"),
    ({"grace_period": 0}, "--grace-period 0: must be at least 1"),
    ({"max_concurrent": 0}, "--max-concurrent 0: must be at least 1"),
    ({"resume": True}, "--resume: give the --name of the sweep to continue"),
])
def test_the_sweeps_own_settings_are_checked_before_any_work(changes, words):
    request = replace(TuneRequest(shards="unused", searches=("train.lr=choice(0.01)",)), **changes)
    with pytest.raises(InputError) as err:
        check_request(request, shapes())
    assert str(err.value) == words


def test_a_sweep_validates_every_epoch():
    """ASHA compares the trials' validation loss at each rung: a config that validates only at the end (the shapes
    preset's train.val_every=0) is swept with 1; another value is kept."""
    assert shapes().train.val_every == 0 and sweep_config(shapes()).train.val_every == 1
    every_2 = shapes().override(["train.val_every=2"])
    assert sweep_config(every_2) is every_2


def test_concurrency_follows_the_clusters_cpus_and_the_limit(ray_session):
    """The session's Ray has 6 logical CPUs and no GPU."""
    assert max_concurrent(1, 1.0, use_gpu=False, limit=None) == 6
    assert max_concurrent(2, 1.0, use_gpu=False, limit=None) == 3
    assert max_concurrent(1, 1.0, use_gpu=False, limit=2) == 2
    assert max_concurrent(4, 2.0, use_gpu=False, limit=None) == 1  # one trial even when none fits: Ray waits
    assert max_concurrent(1, 2.0, use_gpu=True, limit=None) == 1  # no GPU in the cluster


def test_the_table_has_one_line_per_trial():
    rows = [{"trial": "a_00000", "train.lr": 0.0123456, "val_loss": 1.5, "epoch": 2, "stopped_early": False,
             "error": None},
            {"trial": "a_00001", "train.lr": 0.5, "val_loss": None, "epoch": 1, "stopped_early": True, "error": None}]
    lines = format_table(rows, ["train.lr"], "val_loss").splitlines()
    assert lines[0].split() == ["trial", "train.lr", "val_loss", "epoch", "ended"]
    assert lines[1].split() == ["a_00000", "0.01235", "1.5000", "2", "finished"]
    assert lines[2].split() == ["a_00001", "0.5", "-", "1", "stopped", "early"]


@pytest.mark.slow
def test_a_sweep_whose_driver_was_killed_resumes_without_rerunning_or_duplicating(synth_shards, ray_session,
                                                                                   tmp_path):
    """`mrcnn-cli tune` (a subprocess on the session's Ray) is killed once its first trial finished and the second
    one validated; `--resume` ends the sweep: the first trial is not run again (its validation loss logged twice,
    as one run), the second trial logs into the run it made before, one run a trial."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipelines.infra import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = ["train.epochs=2", "train.steps=0", "train.batch_size=2", "train.warmup_steps=1",
            "train.checkpoint_every=100", "train.cache_data=true", "train.val_every=1"]
    args = [sys.executable, "-m", "cli", "tune", "--shards", synth_shards, "--config", "shapes", "--no-gpu",
            "--search", "train.lr=grid(0.02, 0.01)", "--scheduler", "fifo", "--max-concurrent", "1", "--name", "sw",
            "--storage", str(tmp_path / "tune"), "--tracking-uri", uri,
            "--address", ray_session.get_runtime_context().gcs_address, *(a for s in sets for a in ("--set", s))]
    tracking.ensure_experiment(uri)  # the store made here: the polling below and the driver never both create it
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # the sweep's state saved every second
    driver = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[3], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600  # a bound for a hung sweep, not a timing the test relies on
        while True:
            assert driver.poll() is None, "the sweep ended before it was killed"
            assert time.monotonic() < deadline, "the second trial never validated"
            runs = tracking.find_runs(uri, "mrcnn-pipeline", {"stage": "tune-trial"})
            if len(runs) == 2 and tracking.metric_history(uri, runs[1], "val_loss"):
                break
            time.sleep(2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    first, second = runs
    assert len(tracking.metric_history(uri, first, "val_loss")) == 2  # finished before the kill

    config = shapes().override(sets)
    request = TuneRequest(shards=synth_shards, searches=("train.lr=grid(0.02, 0.01)",), scheduler="fifo",
                          max_concurrent=1, name="sw", resume=True)
    result = tune(config, request, RunContext(workers=1, use_gpu=False, storage=str(tmp_path / "tune"),
                                              tracking_uri=uri))
    assert sorted(r["run_id"] for r in result.rows) == sorted(runs)
    assert tracking.find_runs(uri, "mrcnn-pipeline", {"stage": "tune-trial"}) == runs  # none added
    assert len(tracking.metric_history(uri, first, "val_loss")) == 2  # not run again
    assert all(r["step"] == 10 and not r["stopped_early"] for r in result.rows), result.rows
    assert MlflowClient(uri).get_run(result.parent_run_id).info.status == "FINISHED"

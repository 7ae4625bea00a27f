"""A real multi-node Ray cluster on this machine: `ray.cluster_utils.Cluster`, a head with no CPU and two worker
nodes with 2 CPUs each. Every stage is driven from a subprocess through `--address` (the pytest process keeps its
own local Ray for the other modules), with every output under one folder all nodes share.

One training run (the fixed cost of `TorchTrainer.fit` is tens of seconds here) serves the tests:
`mrcnn-cli preprocess` -> train with 2 workers, STRICT_SPREAD (one per worker node; each worker tags the MLflow
run with its node) -> rank 0 pauses right after the step-4 checkpoint (the "pause" fault drill), the test removes
that worker's node and adds a replacement, Ray Train restores from a checkpoint and finishes the 5 asked steps
-> `mrcnn-cli evaluate` of the final checkpoint. Also: `train` without --storage is refused on the cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipelines.training.checkpoints import load_checkpoint

MIB = 1024 * 1024
# 2 logical CPUs a worker node: one for its train worker, one for Ray Data (ingest, preprocess, evaluate actors)
WORKER_NODE = {"num_cpus": 2, "object_store_memory": 128 * MIB}
TIMEOUT_S = 420  # generous: a stuck run fails the test instead of hanging CI


REPO = Path(__file__).resolve().parents[2]

def _env(tracking_uri: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # tests.support
    env.pop("RAY_ADDRESS", None)  # the address is given explicitly: --address is what is tested
    return env


def _tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def _run_cli(args: list[str], *, log: Path, env: dict[str, str], cwd: Path) -> str:
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                              cwd=cwd, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"mrcnn-cli {args[0]} failed:\n{_tail(log)}"
    return log.read_text(errors="replace")


@contextmanager
def _session_ray_untouched():
    """Creating a node in this process points Ray's process-wide internal KV client at that node's GCS, and
    `Cluster.shutdown` clears it: put back the one of this process's own local Ray (other modules' ray_session)."""
    from ray.experimental import internal_kv

    saved = internal_kv.global_gcs_client, internal_kv._initialized
    try:
        yield
    finally:
        internal_kv.global_gcs_client, internal_kv._initialized = saved


def _add_worker_node(cluster):
    with _session_ray_untouched():
        return cluster.add_node(**WORKER_NODE)


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs: work goes to the workers; the drivers attach to it) + 2 worker nodes."""
    from ray.cluster_utils import Cluster

    # A short private temp dir (socket paths are limited to 107 characters). Cluster records its address in
    # <temp>/ray/ray_current_cluster, where a plain `ray.init()` anywhere on this machine would connect to it;
    # under a private RAY_TMPDIR nothing else looks there.
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", ray_tmp)
        with _session_ray_untouched():
            c = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "object_store_memory": 128 * MIB, "include_dashboard": False,
                # a killed node is declared dead after ~5 missed 1 s health checks (Ray's default: 5 x 3 s, each
                # allowed 10 s), so that the restart does not wait half a minute; still lenient on a loaded machine
                "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 3000,
                                   "health_check_failure_threshold": 5,
                                   # no idle workers started ahead (they would not have the jobs' runtime_env):
                                   # on 2 shared cores every needless Python start shows
                                   "prestart_worker_first_driver": False, "enable_worker_prestart": False},
            })
        try:
            for _ in range(2):
                _add_worker_node(c)
            c.wait_for_nodes()
            yield c
        finally:
            with _session_ray_untouched():
                c.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def shards(cluster, synth_dataset, tmp_path_factory):
    """`mrcnn-cli preprocess --address` into a `file://` URI: (root folder, shards URI, MLflow URI)."""
    root = tmp_path_factory.mktemp("multinode")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = f"file://{root / 'shards'}"
    _run_cli(["preprocess", "--dataset", str(synth_dataset), "--split", "train2017", "--split", "val2017",
              "--config", "shapes", "--out", out, "--address", cluster.address],
             log=root / "preprocess.log", env=_env(uri), cwd=root)
    return root, out, uri


DRIVER = """
import json, sys
from dataclasses import replace
from mrcnn.config import shapes
from pipelines.infra.context import RunContext
from pipelines.training.train import TrainRequest, train
from tests.support.fault_drill import FaultDrill
args = json.loads(sys.argv[1])
config = shapes()
config = replace(config, train=replace(config.train, **args.pop("train")))
drill = FaultDrill(**args.pop("fault"))
ctx = RunContext(**args.pop("ctx"))
result = train(config, TrainRequest(**args), ctx, after_step=drill)
print("RESULT " + json.dumps({"checkpoint": result.checkpoint, "step": result.metrics["step"]}))
"""


@dataclass
class NodeLossRun:
    storage: Path
    result: dict  # the driver's TrainResult: final checkpoint and step
    run: Any  # the MLflow train run, after the run
    tracking_uri: str
    lost: str  # node ids: the worker node taken away (where rank 0 paused), the survivor, the replacement
    survivor: str
    replacement: str
    placed_before: dict[int, str]  # rank -> node id as the workers tagged it before the loss
    head: str


@pytest.fixture(scope="module")
def node_loss_run(cluster, shards) -> NodeLossRun:
    """Train 5 steps with 2 workers (STRICT_SPREAD) through `--address`; rank 0 pauses after the step-4
    checkpoint; its node is removed and a replacement added; the run must restore and finish."""
    root, shards_uri, uri = shards
    storage, marker, log = root / "checkpoints", root / "pause-marker", root / "train.log"
    args = {
        "train": {"steps": 5, "batch_size": 1, "checkpoint_every": 2, "warmup_steps": 2, "log_every": 1,
                  "num_to_keep": 10, "max_failures": 2},
        "ctx": {"workers": 2, "use_gpu": False, "storage": str(storage), "address": cluster.address},
        "shards": shards_uri, "val_split": None, "placement_strategy": "STRICT_SPREAD", "run_name": "node-loss",
        "log_model": False, "fault": {"at_step": 4, "marker": str(marker), "mode": "pause"},
    }
    before = {n.node_id: n for n in cluster.worker_nodes}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], stdout=out,
                                stderr=subprocess.STDOUT, env=_env(uri), cwd=root)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert marker.exists(), f"rank 0 never paused (exit code {proc.poll()}):\n{_tail(log)}"
            text = marker.read_text()
            assert text.startswith("paused at step 4 on node "), text
            lost = text.split()[-1]
            assert lost in before, (lost, list(before))  # rank 0 runs on a worker node, not on the head
            run = _mlflow_run(uri, "node-loss")  # written by the workers as they started
            placed_before = {r: run.data.tags.get(f"worker_node.rank{r}") for r in (0, 1)}

            cluster.remove_node(before[lost], allow_graceful=False)  # the node and its train worker die
            replacement = _add_worker_node(cluster)
            proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, f"training did not survive the node loss:\n{_tail(log)}"
    result = json.loads(next(line for line in log.read_text().splitlines() if line.startswith("RESULT "))[7:])
    return NodeLossRun(
        storage=storage, result=result, run=_mlflow_run(uri, "node-loss"), tracking_uri=uri, lost=lost,
        survivor=(set(before) - {lost}).pop(), replacement=replacement.node_id, placed_before=placed_before,
        head=cluster.head_node.node_id,
    )


def _checkpoint_steps(storage: Path) -> list[int]:
    """The step of every checkpoint under `storage`, each loaded in full (weights_only): none is corrupt."""
    dirs = sorted(d for d in storage.glob("*/checkpoint_*") if d.is_dir())
    assert dirs, f"no checkpoint under {storage}"
    return sorted(load_checkpoint(d).step for d in dirs)


def _mlflow_run(uri: str, run_name: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("mrcnn-pipeline")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == run_name]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


@pytest.mark.slow
def test_train_workers_are_placed_one_per_worker_node(node_loss_run):
    r = node_loss_run
    # STRICT_SPREAD put rank 0 and rank 1 on the two worker nodes (PACK would have put both on one; the head has
    # no CPU); rank 0 paused on the node the test then removed
    assert set(r.placed_before.values()) == {r.lost, r.survivor} and r.placed_before[0] == r.lost
    assert r.head not in r.placed_before.values()
    assert r.run.data.params["placement_strategy"] == "STRICT_SPREAD" and r.run.data.params["workers"] == "2"
    # after the loss, the restarted workers run on the surviving node and the replacement: again one per node
    placed_after = {r.run.data.tags[f"worker_node.rank{k}"] for k in (0, 1)}
    assert placed_after == {r.survivor, r.replacement}


@pytest.mark.slow
def test_node_loss_restores_from_checkpoint_and_completes(node_loss_run):
    r = node_loss_run
    assert r.result["step"] == 5 and load_checkpoint(r.result["checkpoint"]).step == 5
    assert Path(r.result["checkpoint"]).is_relative_to(r.storage)
    # Every checkpoint loads. The one at step 2 exists once: the second attempt restored from a checkpoint (from
    # step 4, or from step 2 if the controller had not yet registered step 4 when the node went), not from scratch.
    steps = _checkpoint_steps(r.storage)
    assert steps.count(2) == 1 and steps.count(5) == 1 and set(steps) == {2, 4, 5}, steps
    client = MlflowClient(r.tracking_uri)
    assert r.run.info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(r.run.info.run_id, "loss")} == {1, 2, 3, 4, 5}


@pytest.mark.slow
def test_evaluate_on_the_cluster(cluster, shards, node_loss_run):
    root, shards_uri, uri = shards
    out = root / "eval"
    _run_cli(["evaluate", "--shards", shards_uri, "--model-path", node_loss_run.result["checkpoint"], "--split",
              "val2017", "--out", str(out), "--no-gpu", "--address", cluster.address],
             log=root / "evaluate.log", env=_env(uri), cwd=root)
    assert {"bbox/AP", "segm/AP"} <= set(json.loads((out / "metrics.json").read_text()))
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    run = _mlflow_run(uri, "evaluate-val2017")
    assert run.data.params["images"] == str(manifest["splits"]["val2017"]["num_images"])  # every image evaluated


@pytest.mark.slow
def test_training_on_a_multi_node_cluster_requires_storage(cluster, shards):
    root, shards_uri, uri = shards
    cwd, log = root / "no-storage", root / "no-storage.log"
    cwd.mkdir()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "cli", "train", "--shards", shards_uri, "--config", "shapes",
                               "--steps", "1", "--no-gpu", "--address", cluster.address], stdout=out,
                              stderr=subprocess.STDOUT, env=_env(uri), cwd=cwd, timeout=TIMEOUT_S)
    text = " ".join(log.read_text().replace("│", " ").split())  # the short message, in rich's error box
    assert proc.returncode != 0 and "--storage is required on a multi-node cluster" in text, _tail(log)
    assert list(cwd.iterdir()) == []  # refused before anything was written (no node-local ./checkpoints)


def test_placement_strategy_is_checked_before_any_work(tmp_path):
    from cli import app
    from mrcnn.config import shapes
    from pipelines.infra.context import RunContext
    from pipelines.training.train import TrainRequest, train

    result = CliRunner().invoke(app, ["train", "--shards", str(tmp_path), "--placement-strategy", "sideways"])
    assert result.exit_code == 2 and "STRICT_SPREAD" in result.output
    with pytest.raises(ValueError, match="placement strategy 'sideways'"):
        train(shapes(), TrainRequest(shards=str(tmp_path / "absent"), placement_strategy="sideways"), RunContext())

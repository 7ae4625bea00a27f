"""System metrics of a training run: MLflow's own monitor, on a real SQLite store, ending with at least one value of
each metric however short the run; the node's label; best effort when the store is gone."""

import logging

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipelines.infra.system_metrics import SystemMetrics, node_label

CPU, MEMORY = "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (making one takes seconds), a run per test."""
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("t", artifact_location=str(tmp / "art"))


@pytest.fixture
def run(store):
    uri, client, experiment = store
    return uri, client, client.create_run(experiment).info.run_id


def test_a_run_shorter_than_one_interval_still_logs_the_nodes_cpu_and_memory(run):
    uri, client, run_id = run
    # an hour's interval: MLflow's loop alone would publish nothing before it is stopped
    with SystemMetrics(uri, run_id, interval=3600) as metrics:
        assert metrics.gpus == 0  # no NVIDIA GPU here: no gpu_* keys
    logged = client.get_run(run_id).data.metrics
    assert 0 <= logged[CPU] <= 100
    # psutil's own reading of the same node, within what the test process itself can move in between
    assert logged[MEMORY] == pytest.approx(psutil.virtual_memory().used / 1e6, rel=0.25)
    assert not [k for k in logged if k.startswith("system/gpu")]
    assert [m.step for m in client.get_metric_history(run_id, CPU)] == [0]


def test_a_restarted_worker_continues_the_steps_and_a_node_label_prefixes_the_keys(run):
    uri, client, run_id = run
    with SystemMetrics(uri, run_id, interval=3600):
        pass
    with SystemMetrics(uri, run_id, interval=3600, resume=True):  # the worker restored after a failure
        pass
    assert [m.step for m in client.get_metric_history(run_id, CPU)] == [0, 1]
    with SystemMetrics(uri, run_id, interval=3600, node_id="node1"):
        pass
    assert client.get_metric_history(run_id, "system/node1/cpu_utilization_percentage")


def test_interval_zero_or_no_run_logs_nothing(run):
    uri, client, run_id = run
    with SystemMetrics(uri, run_id, interval=0) as metrics:
        assert metrics.monitor is None
    with SystemMetrics(uri, None, interval=10) as metrics:
        assert metrics.monitor is None
    assert not client.get_run(run_id).data.metrics


def test_a_run_that_is_gone_is_one_warning_not_a_failed_training(store, caplog):
    uri = store[0]
    with caplog.at_level(logging.WARNING, logger="mrcnn"), SystemMetrics(uri, "no-such-run", interval=3600):
        pass
    assert "system metrics" in caplog.text


def test_node_label():
    assert node_label(["a", "a"], "a") is None  # one node: plain system/<metric>
    assert node_label(["a", "b", "a", "c"], "a") == "node0"  # rank 0's node first
    assert node_label(["a", "b", "a", "c"], "b") == "node1"
    assert node_label(["a", "b", "a", "c"], "c") == "node2"

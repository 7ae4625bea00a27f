"""System metrics of a training run in MLflow: CPU and memory use of the node and, where NVML finds NVIDIA GPUs
(nvidia-ml-py), each GPU's utilisation, memory and power, under `system/` (MLflow's "System metrics" tab).

MLflow's own `SystemMetricsMonitor` does the sampling: a daemon thread that samples every `interval` seconds
(psutil's system-wide CPU percent and memory, NVML per GPU), logs the mean of its samples through a batching
logger, and stops when the run is no longer RUNNING. In a Ray Train worker it runs beside the step on its own
thread: the step never waits on it (its psutil and NVML calls take well under a millisecond a sample, its MLflow
writes happen on that thread). NVML sees every GPU of the node whatever CUDA_VISIBLE_DEVICES says, and psutil the
whole node, so one monitor per node is enough: the worker with local rank 0 runs it
(pipelines/training/loop.py), its keys carrying `node<i>/` where the run spans several nodes.

A run shorter than one interval would log nothing with MLflow's loop alone (it publishes after a full interval and
drops what it sampled when told to stop); `SystemMetrics.stop` publishes what was sampled since the last publish,
so every monitored run ends with at least one value of each metric.
"""

from __future__ import annotations

from types import TracebackType

from pipelines.infra.logs import get_logger

log = get_logger("system-metrics")
PREFIX = "system/"


class SystemMetrics:
    """A context manager: MLflow's system-metrics monitor on `run_id` for the block. `interval` 0: nothing.
    Best effort: the tracking store unreachable at the start or the end is said in one warning line, never a
    failed training."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, *, interval: float, node_id: str | None = None,
                 resume: bool = False):
        self.tracking_uri, self.run_id, self.interval, self.node_id = tracking_uri, run_id, interval, node_id
        self.resume = resume  # a restarted worker continues the steps of the run's system metrics
        self.monitor = None

    def __enter__(self) -> SystemMetrics:
        if self.interval > 0 and self.run_id:
            self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # MLflow with training only

        try:
            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.interval,
                                                resume_logging=self.resume, node_id=self.node_id,
                                                tracking_uri=self.tracking_uri)
            self.monitor.start()
        except Exception as exc:  # the store unreachable: training matters more; said, not hidden
            log.warning("system metrics are not logged: %s: %s", type(exc).__name__, exc)
            self.monitor = None

    def stop(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        try:
            monitor.finish()  # the thread stops; what it had queued is written
            last = monitor.aggregate_metrics()  # the samples since its last publish
            if last:
                monitor.publish_metrics(last)
                monitor.mlflow_logger.flush()
        except Exception as exc:
            log.warning("the last system metrics were not logged: %s: %s", type(exc).__name__, exc)

    @property
    def gpus(self) -> int:
        """The GPUs NVML found (0 without nvidia-ml-py, a driver or a GPU)."""
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        found = [m for m in (self.monitor.monitors if self.monitor else []) if isinstance(m, GPUMonitor)]
        return found[0].num_gpus if found else 0


def node_label(node_ids: list[str], mine: str) -> str | None:
    """The `node_id` of this node's metrics: None for a run on one node (plain `system/<metric>`), else
    `node<i>` by the order in which the nodes first appear among the ranks (rank 0's node is node0)."""
    order = list(dict.fromkeys(node_ids))
    return None if len(order) <= 1 else f"node{order.index(mine)}"

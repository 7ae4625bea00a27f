"""What `pipelines.infra.ray_env` reads off a running Ray."""

from __future__ import annotations

import os

from pipelines.infra.ray_env import cluster_nodes, usable_cpus


def test_usable_cpus_on_one_node_are_its_cores_not_the_logical_cpus_advertised(ray_session):
    """The session's local Ray advertises 6 logical CPUs; a CPU-bound pool gets this machine's cores (2 here)."""
    advertised = int(ray_session.cluster_resources()["CPU"])
    assert cluster_nodes() == 1 and advertised == 6
    assert usable_cpus() == min(advertised, os.cpu_count())
    assert usable_cpus() < advertised or os.cpu_count() >= advertised


def test_one_node_caps_concurrent_tasks_at_its_cores(ray_session):
    from pipelines.infra.ray_env import one_node_task_concurrency

    assert one_node_task_concurrency() == usable_cpus() == min(6, os.cpu_count())

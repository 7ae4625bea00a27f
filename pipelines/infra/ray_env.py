"""Connecting to Ray the same way from every stage: `--address` / `RAY_ADDRESS`, else a local Ray.

Code reaches the workers of a remote cluster through `runtime_env` (`py_modules`: our two packages), so
a cluster needs only the dependencies installed, not this checkout (docs/design.md, "Ray").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mrcnn
import pipelines
from pipelines.infra import logs

# Ray's workers' output as the driver receives it, when the console is the project's: to the log file
WORKER_OUTPUT_LOGGER = "ray.worker_output"


def worker_env_vars() -> dict[str, str]:
    """Environment of every Ray worker: Ray Data's progress bars as the caller's environment says, and Ray
    Train's print patch off (it sends a train worker's `print` both to the console and through the logging
    module, so each progress line reached the driver twice)."""
    return {
        "RAY_DATA_DISABLE_PROGRESS_BARS": os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0"),
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }


def runtime_env() -> dict[str, Any]:
    """Ship `mrcnn/` and `pipelines/` to every worker, with `worker_env_vars`."""
    return {
        "py_modules": [str(Path(mrcnn.__file__).parent), str(Path(pipelines.__file__).parent)],
        "env_vars": worker_env_vars(),
    }


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> str:
    """Connect to `address` (or RAY_ADDRESS) or start a local Ray; a no-op when Ray is already up.

    Returns where Ray runs ("local" or the address). A local Ray started here advertises at least 4 logical
    CPUs so that Ray Data keeps CPU while train workers run on a 2-core machine (else a dataset job can hang).
    """
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        sort_worker_output()
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=not quiet)
        logs.route_library_logs()
        return address
    cpus = num_cpus or max(os.cpu_count() or 1, 4)
    sort_worker_output()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True, configure_logging=True,
             runtime_env={"env_vars": worker_env_vars()})  # the code is importable here: no py_modules
    logs.route_library_logs()  # ray.init gave Ray's loggers console handlers again
    return "local"


def worker_output_router(original: Callable[..., None]) -> Callable[..., None]:
    """Ray's `print_to_stdstream(data, ignore_prefix)` (what the driver does with each batch of a worker's
    output lines and the raylet's messages) keeping the console for the project's lines (`[stage] message`,
    shown without Ray's `(pid=...)` prefix) and Ray's progress bars (tqdm_ray's state lines); every other line
    goes to the log file through the WORKER_OUTPUT_LOGGER logger, with the worker it came from."""
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    file_log = logging.getLogger(WORKER_OUTPUT_LOGGER)

    def route(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        lines = data.get("lines") or []
        project = [line for line in lines if logs.is_project_line(line)]
        bars = [line for line in lines if RAY_TQDM_MAGIC in line]
        source = " ".join(str(data[k]) for k in ("actor_name", "task_name", "pid") if data.get(k))
        for line in lines:
            if RAY_TQDM_MAGIC not in line and not logs.is_project_line(line):
                file_log.info("(%s) %s", source, line)
        if bars:
            original({**data, "lines": bars}, ignore_prefix=ignore_prefix)
        if project:
            original({**data, "lines": project}, ignore_prefix=True)

    route.__wrapped__ = original  # type: ignore[attr-defined]
    return route


def sort_worker_output() -> bool:
    """Put `worker_output_router` between Ray's workers and the driver's console when the project's logging has
    a log file and is not verbose (`logs.verbose()`); before `ray.init`, which hands Ray's printing function to
    its log thread. Returns whether it is in place. (A private Ray function: Ray's public switch,
    `log_to_driver=False`, would silence the project's lines from the workers as well.)"""
    from ray._private import worker

    if not callable(getattr(worker, "print_to_stdstream", None)):  # another Ray: its workers print as Ray does
        logging.getLogger(WORKER_OUTPUT_LOGGER).warning(
            "this Ray has no ray._private.worker.print_to_stdstream: its workers' output is not sorted")
        return False
    current = worker.print_to_stdstream
    original = getattr(current, "__wrapped__", current)
    if logs.verbose():
        worker.print_to_stdstream = original
        return False
    worker.print_to_stdstream = worker_output_router(original)
    return True


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def cluster_nodes() -> int:
    import ray

    return len([n for n in ray.nodes() if n.get("Alive")])


def largest_node_cpus() -> float:
    """The CPUs of the alive node with the most: an actor asking for more is never placed (Ray waits forever)."""
    import ray

    return max((float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)

"""Connecting to Ray the same way from every stage: `--address` / `RAY_ADDRESS`, else a local Ray.

Code reaches the workers of a remote cluster through `runtime_env` (`py_modules`: our two packages), so
a cluster needs only the dependencies installed, not this checkout (docs/design.md, "Ray").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mrcnn
import pipelines


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
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=not quiet)
        return address
    cpus = num_cpus or max(os.cpu_count() or 1, 4)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True, configure_logging=True,
             runtime_env={"env_vars": worker_env_vars()})  # the code is importable here: no py_modules
    return "local"


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def cluster_nodes() -> int:
    import ray

    return len([n for n in ray.nodes() if n.get("Alive")])

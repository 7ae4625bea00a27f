"""Fault drills for the training tests: hung on `train(..., after_step=FaultDrill(...))`, run in the workers.

Production code carries no fault injection: `WorkerPlan.after_step` is a plain per-step callback, and this
module is pickled to the Ray workers by value (`register_pickle_by_value`), so a cluster's workers need not have
the tests installed.
"""

from __future__ import annotations

import os
import sys
import time

import ray.cloudpickle
import ray.train


class FaultDrill:
    """A fault-tolerance drill on rank 0, right after step `at_step` (after that step's checkpoint, if any, was
    reported), once per `marker` file, so that Ray Train's restore-from-checkpoint path can be exercised.
    Mode "exit": the process dies hard (as on an OOM kill). Mode "pause": it writes the marker (naming its Ray
    node) and blocks for good, so that a test can take that node away at a known step (a lost node); it needs
    the marker, and hangs the run if nobody does.
    run: only in the Ray Train run whose name ends with it (a sweep's trial: its runs are named by trial id,
    `..._00002` the third of a grid); None: in any run.
    registered: first wait until Ray Train registered a checkpoint of the run. Train V2 registers a report when
    its controller next polls the workers (every 2 s): a worker that dies before that takes the report with it,
    and the run restarts from the checkpoint before (or from scratch)."""

    def __init__(self, at_step: int, marker: str, mode: str = "exit", run: str | None = None,
                 registered: bool = False):
        if mode not in ("exit", "pause"):
            raise ValueError(f"fault drill mode {mode!r}: 'exit' or 'pause'")
        self.at_step, self.marker, self.mode, self.run = at_step, marker, mode, run
        self.registered = registered

    def __call__(self, step: int, rank: int) -> None:
        if step != self.at_step or rank != 0 or os.path.exists(self.marker):
            return
        if self.run is not None and not ray.train.get_context().get_experiment_name().endswith(self.run):
            return
        if self.mode == "pause":
            node = ray.get_runtime_context().get_node_id()
            with open(self.marker + ".tmp", "w") as f:  # renamed into place: a watcher never reads half of it
                f.write(f"paused at step {step} on node {node}\n")
            os.replace(self.marker + ".tmp", self.marker)
            print(f"fault drill: worker pauses at step {step} on node {node}", file=sys.stderr, flush=True)
            while True:
                time.sleep(1)
        if self.registered:
            wait_for_a_registered_checkpoint()
        with open(self.marker, "w") as f:
            f.write(f"killed at step {step}\n")
        print(f"fault drill: worker process exits at step {step}", file=sys.stderr, flush=True)
        os._exit(1)


def wait_for_a_registered_checkpoint(timeout_s: float = 600) -> None:
    """Until the run's checkpoint manager snapshot (Ray Train V2 writes it when it registers a checkpoint) names a
    latest checkpoint."""
    import json

    path = ray.train.get_context().get_storage().checkpoint_manager_snapshot_path
    deadline = time.monotonic() + timeout_s  # a bound for a hung run, not a timing the drill relies on
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                if json.load(f).get("latest_checkpoint_result"):
                    return
        except (OSError, ValueError):  # not written yet, or being written
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no checkpoint registered in {path} within {timeout_s:.0f} s")


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

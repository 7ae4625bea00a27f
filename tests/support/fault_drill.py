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


class FaultDrill:
    """A fault-tolerance drill on rank 0, right after step `at_step` (after that step's checkpoint, if any, was
    reported), once per `marker` file, so that Ray Train's restore-from-checkpoint path can be exercised.
    Mode "exit": the process dies hard (as on an OOM kill). Mode "pause": it writes the marker (naming its Ray
    node) and blocks for good, so that a test can take that node away at a known step (a lost node); it needs
    the marker, and hangs the run if nobody does."""

    def __init__(self, at_step: int, marker: str, mode: str = "exit"):
        if mode not in ("exit", "pause"):
            raise ValueError(f"fault drill mode {mode!r}: 'exit' or 'pause'")
        self.at_step, self.marker, self.mode = at_step, marker, mode

    def __call__(self, step: int, rank: int) -> None:
        if step != self.at_step or rank != 0 or os.path.exists(self.marker):
            return
        if self.mode == "pause":
            node = ray.get_runtime_context().get_node_id()
            with open(self.marker + ".tmp", "w") as f:  # renamed into place: a watcher never reads half of it
                f.write(f"paused at step {step} on node {node}\n")
            os.replace(self.marker + ".tmp", self.marker)
            print(f"fault drill: worker pauses at step {step} on node {node}", file=sys.stderr, flush=True)
            while True:
                time.sleep(1)
        with open(self.marker, "w") as f:
            f.write(f"killed at step {step}\n")
        print(f"fault drill: worker process exits at step {step}", file=sys.stderr, flush=True)
        os._exit(1)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

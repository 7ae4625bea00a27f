"""Connecting to Ray the same way from every stage: `--address` / `RAY_ADDRESS`, else a local Ray.

Code reaches the workers of a remote cluster through `runtime_env` (`py_modules`: our two packages), so
a cluster needs only the dependencies installed, not this checkout (docs/design.md, "Ray").
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mrcnn
import pipelines
from pipelines.infra import logs

# Ray's workers' output as the driver receives it, when the console is the project's: to the log file
WORKER_OUTPUT_LOGGER = "ray.worker_output"
# Ray's progress bars as lines, where the console is not a terminal and is the project's: to the log file
PROGRESS_BARS_LOGGER = "ray.progress_bars"


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
    # importing Ray gave its loggers a console handler: Ray's start-up lines ("Started a local Ray instance", the
    # token authentication warning) go to the log file like its other records (unless verbose)
    logs.route_library_logs()
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


# "Running Dataset: ds_1_0. Active ...", "✔️  Dataset ds_1_0 execution finished ..."
_DATASET_NAME = re.compile(r"Dataset:? (\S+?)\.?(?:\s|:|$)")
_OPERATOR_NAME = re.compile(r"^\s*- ([^:]+)")  # "- MapBatches(RowMaker): Tasks: 8; ..."


class PlainBars:
    """Ray's progress bars (tqdm_ray's states) as the project's one-line progress bars, for a console that is not a
    terminal (a CI log, `make demo 2>&1 | tee`), where tqdm's carriage returns and cursor moves come out as
    escape-code junk. Each bar gives a line every `every_s` seconds, e.g.
    `MapBatches(RowMaker) [######------------------] 352/944 (37%) 32.7 row/s ETA 18s` (Ray Data's operators) or
    `dataset_12_0: 10 row (0.7 row/s)`, and a dataset's bar one line when it closes: `dataset_12_0: 944 row in
    40s`."""

    def __init__(self, every_s: float = 15.0, clock: Callable[[], float] = time.monotonic):
        self.every_s, self.clock = every_s, clock
        self._bars: dict[str, tuple[float, float]] = {}  # uuid -> (first seen, last line given)

    def __call__(self, state: dict[str, Any]) -> str | None:
        """One bar state (tqdm_ray's `_get_state()`) -> the progress line to show now, or None."""
        desc = str(state.get("desc") or "")
        operator = _OPERATOR_NAME.match(desc)
        now, key = self.clock(), str(state.get("uuid"))
        first, last = self._bars.setdefault(key, (now, now))
        closed = bool(state.get("closed"))
        if closed:
            self._bars.pop(key)
        if closed and operator:  # the dataset's own line says it is done
            return None
        if not closed and now - last < self.every_s:
            return None
        if not closed:
            self._bars[key] = (first, now)
        done, total, unit = int(state.get("x") or 0), state.get("total"), str(state.get("unit") or "it").strip()
        elapsed = now - first
        rate = done / elapsed if elapsed > 0 else 0.0
        dataset = _DATASET_NAME.search(desc)
        name = (operator.group(1).strip() if operator else dataset.group(1) if dataset
                else desc.split(":")[0].strip()[:60] or "progress")
        if closed:
            took = f" in {logs.format_seconds(elapsed)}" if elapsed >= 1 else ""
            return f"{name}: {done} {unit}{took}"
        if total:
            return f"{name} {logs.progress(done, int(total), rate=rate, unit=unit + '/s')}"
        return f"{name}: {done} {unit} ({rate:.1f} {unit}/s)"


def sort_progress_bars(terminal: bool | None = None) -> str:
    """How the driver shows Ray's progress bars: the tqdm_ray manager that draws the bars of the driver's own
    datasets and those Ray's workers send (a Ray Data dataset gives one bar and one per operator) is wrapped.

    - "live": on a terminal (stderr a tty, or `terminal=True`), one live bar per dataset, the operators' bars
      left out, so a stage shows one bar;
    - "file": elsewhere (a Ray job's log, CI, `| tee`), where tqdm's redraws would be lines of escape codes, the
      bars as `PlainBars` lines to the log file (PROGRESS_BARS_LOGGER): the console keeps the project's lines;
    - "console": the same lines as the project's `[data]` lines, when the libraries may write to the console
      (`logs.verbose()`: no log file or `--verbose`);
    - "ray": Ray draws its bars as it does (verbose on a terminal, or a Ray whose manager this does not know).

    Returns which. (`tqdm_ray.instance().process_state_update` is Ray's, not a public switch.)"""
    from ray.experimental import tqdm_ray

    manager = tqdm_ray.instance()
    current = getattr(manager, "process_state_update", None)
    if not callable(current):
        return "ray"
    original = getattr(current, "__wrapped__", current)
    if terminal is None:
        terminal = sys.stderr.isatty()
    if terminal and logs.verbose():
        manager.process_state_update = original
        return "ray"
    if terminal:
        def update(state: dict[str, Any]) -> None:
            if not _OPERATOR_NAME.match(str(state.get("desc") or "")):
                original(state)

        mode = "live"
    else:
        bars = PlainBars()
        mode = "console" if logs.verbose() else "file"
        log = logs.get_logger("data") if mode == "console" else logging.getLogger(PROGRESS_BARS_LOGGER)

        def update(state: dict[str, Any]) -> None:
            text = bars(state)
            if text:
                log.info("%s", text)

    update.__wrapped__ = original  # type: ignore[attr-defined]
    manager.process_state_update = update
    return mode


def worker_output_router(original: Callable[..., None]) -> Callable[..., None]:
    """Ray's `print_to_stdstream(data, ignore_prefix)` (what the driver does with each batch of a worker's
    output lines and the raylet's messages) keeping the console for the project's lines (`[stage] message`,
    shown without Ray's `(pid=...)` prefix) and Ray's progress bars (tqdm_ray's state lines, drawn by Ray's
    tqdm_ray manager: `sort_progress_bars`); every other line goes to the log file through the
    WORKER_OUTPUT_LOGGER logger, with the worker it came from."""
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
    its log thread; and Ray's bars as `sort_progress_bars` says.
    Returns whether the router is in place. (A private Ray function: Ray's public switch,
    `log_to_driver=False`, would silence the project's lines from the workers as well.)"""
    from ray._private import worker

    if not callable(getattr(worker, "print_to_stdstream", None)):  # another Ray: its workers print as Ray does
        logging.getLogger(WORKER_OUTPUT_LOGGER).warning(
            "this Ray has no ray._private.worker.print_to_stdstream: its workers' output is not sorted")
        return False
    sort_progress_bars()
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


def usable_cpus() -> int:
    """The cluster's CPUs for a CPU-bound pool, but on one node no more than its cores: a local Ray advertises
    at least 4 logical CPUs on a 2-core machine (`init_ray`), and 4 actors there only share 2 cores after each
    has paid its start-up (importing torch)."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return min(cpus, os.cpu_count() or cpus) if cluster_nodes() == 1 else cpus


def one_node_task_concurrency() -> int | None:
    """A cap for the concurrent tasks of a `map_batches` on a one-node Ray: its cores (`usable_cpus`). Each
    concurrent task needs a worker process, and on a 2-core machine advertising 4 CPUs, 0.5-CPU tasks started 8
    of them, each importing torch before its first batch. None (no cap) without Ray or on a cluster."""
    import ray

    if not ray.is_initialized() or cluster_nodes() != 1:
        return None
    return usable_cpus()


def largest_node_cpus() -> float:
    """The CPUs of the alive node with the most: an actor asking for more is never placed (Ray waits forever)."""
    import ray

    return max((float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)

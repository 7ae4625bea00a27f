"""The console is the project's: libraries' records, Python warnings and what Ray's workers print besides the
project's lines go to the log file (unless verbose); the project's lines reach the console and the file."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from pipelines.infra import logs
from pipelines.infra.ray_env import (
    PROGRESS_BARS_LOGGER,
    WORKER_OUTPUT_LOGGER,
    PlainBars,
    sort_progress_bars,
    worker_output_router,
)


@pytest.fixture
def routing():
    """The logging state `setup_logging(log_file=...)` changes, restored afterwards (the process is shared)."""
    root = logging.getLogger()
    project = logging.getLogger(logs.ROOT_LOGGER)
    saved = (dict(logs._routing), list(root.handlers), root.level, list(project.handlers))
    # from a clean start, whatever a CLI test of this process set up before
    logs._routing.update(log_file=None, verbose=False)
    logging.captureWarnings(False)
    library = logging.getLogger("somelib")
    console = io.TextIOWrapper(io.BytesIO(), write_through=True)  # a terminal-like stream, not a StringIO capture
    library_console = logging.StreamHandler(console)
    library.addHandler(library_console)
    project_console = io.StringIO()
    logs.setup_logging(stream=project_console)
    yield library, console, project_console
    library.removeHandler(library_console)
    library.propagate = True
    logging.captureWarnings(False)
    for h in root.handlers:
        if getattr(h, "_mrcnn_file", None) and h not in saved[1]:
            h.close()
    logs._routing.clear()
    logs._routing.update(saved[0])
    root.handlers[:] = saved[1]
    root.setLevel(saved[2])
    project.handlers[:] = saved[3]
    logs.setup_logging(stream=None)
    for h in project.handlers:
        if getattr(h, "_mrcnn", False):
            h.stream = None  # back to sys.stderr at each record


def _said(stream) -> str:
    stream.seek(0)
    return stream.read()


def test_library_records_and_warnings_go_to_the_file_not_the_console(routing, tmp_path):
    library, console, project_console = routing
    path = tmp_path / "logs" / "run.log"
    logs.setup_logging(log_file=path)
    library.warning("Failed to query Ray Train Controller actor state")
    warnings.warn("tqdm is not installed", UserWarning, stacklevel=1)
    logs.get_logger("train").info("step 3/10")
    for h in logging.getLogger().handlers:
        h.flush()
    text = path.read_text()
    assert "WARNING somelib: Failed to query Ray Train Controller actor state" in text
    assert "tqdm is not installed" in text and "step 3/10" in text  # the project's lines too, for context
    assert _said(console) == ""  # the library's own console handler is gone
    assert project_console.getvalue() == "[train] step 3/10\n"
    assert logs.log_file() == path.resolve() and not logs.verbose()


def test_verbose_keeps_the_libraries_on_the_console_and_still_writes_the_file(routing, tmp_path):
    library, console, _ = routing
    path = tmp_path / "run.log"
    logs.setup_logging(log_file=path, verbose=True)
    library.warning("an internal warning")
    for h in logging.getLogger().handlers:
        h.flush()
    assert "an internal warning" in _said(console) and "an internal warning" in path.read_text()
    assert logs.verbose()


def test_without_a_log_file_nothing_is_rerouted(routing):
    library, console, _ = routing
    assert logs.route_library_logs() is None and logs.verbose()
    library.warning("as before")
    assert "as before" in _said(console)


def test_worker_output_router_keeps_project_lines_and_progress_bars(routing, tmp_path):
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    path = tmp_path / "run.log"
    logs.setup_logging(log_file=path)
    printed = []
    route = worker_output_router(lambda data, ignore_prefix=False: printed.append((data["lines"], ignore_prefix)))
    bar = f'{{"{RAY_TQDM_MAGIC}": true, "x": 1}}'
    route({"lines": ["[preprocess] train2017: 8 images", "[2025-01-01 10:00:00,000 E 12 34] core_worker.cc:1 boom",
                     bar, "FutureWarning: ray.train.report is deprecated", "[train] warning: 1 non-finite loss"],
           "pid": 1234, "actor_name": "RayTrainWorker", "is_err": True}, ignore_prefix=False)
    route({"lines": ["PYTHON worker processes have been started ... 4x the maximum"], "pid": "raylet",
           "is_err": False}, ignore_prefix=False)
    # the project's lines without Ray's (pid=...) prefix, the bars through Ray's own handling
    ours = ["[preprocess] train2017: 8 images", "[train] warning: 1 non-finite loss"]
    assert printed == [([bar], False), (ours, True)]
    for h in logging.getLogger().handlers:
        h.flush()
    text = path.read_text()
    assert f"{WORKER_OUTPUT_LOGGER}: (RayTrainWorker 1234) [2025-01-01 10:00:00,000 E 12 34] core_worker.cc" in text
    assert "FutureWarning: ray.train.report" in text and "(raylet) PYTHON worker processes" in text
    assert RAY_TQDM_MAGIC not in text


@pytest.mark.parametrize("line, ours", [
    ("[train] step 1/2", True), ("[run] preprocess: done in 12s", True), ("[train] warning: x", True),
    ("[2025-01-01 10:00:00,000 E 1 2] core_worker.cc", False),
    ("(pid=1) [train] x", False), ("Running Dataset: dataset_3_0", False), ("[Ray] x", False),
])
def test_project_lines(line, ours):
    assert logs.is_project_line(line) is ours


def test_progress_bar_line():
    assert logs.progress(120, 320, rate=3.2, unit="img/s", eta=62) == (
        "[#########---------------] 120/320 (37%) 3.2 img/s ETA 1m02s")
    assert logs.progress(320, 320, rate=4.0, unit="img/s").startswith("[" + "#" * 24 + "] 320/320 (100%)")
    assert logs.progress(0, 10, rate=0.0, unit="img/s").endswith("ETA ?")
    assert [logs.format_seconds(s) for s in (12, 125, 3725)] == ["12s", "2m05s", "1h02m"]


def _bar(x, total, *, desc="Running Dataset: dataset_12_0. Active & requested resources: 1/4 CPU", closed=False,
         uuid="a"):
    return {"x": x, "total": total, "desc": desc, "unit": "row", "uuid": uuid, "closed": closed, "pos": 0}


def test_plain_bars_give_a_line_every_so_often_and_one_at_the_end():
    now = [100.0]
    bars = PlainBars(every_s=15.0, clock=lambda: now[0])
    operator = "- MapBatches(RowMaker): Tasks: 8; Actors: 4; Queued blocks: 67 (0.0B)"
    shown = []
    for t, state in ((100, _bar(0, None)), (101, _bar(0, 944, desc=operator, uuid="op")),
                     (105, _bar(1, None)), (116, _bar(4, None)), (117, _bar(400, 944, desc=operator, uuid="op")),
                     (120, _bar(500, 944, desc=operator, uuid="op")),
                     (125, _bar(944, 944, desc=operator, uuid="op", closed=True)),
                     (140, _bar(944, 944, desc="✔️  Dataset dataset_12_0 execution finished in 40 seconds",
                                closed=True))):
        now[0] = float(t)
        shown.append(bars(state))
    # 400 rows 16 s after the operator's bar first came: 25 rows/s, 544 left -> 22 s
    assert shown == [None, None, None, "dataset_12_0: 4 row (0.2 row/s)",
                     "MapBatches(RowMaker) [##########--------------] 400/944 (42%) 25.0 row/s ETA 22s", None, None,
                     "dataset_12_0: 944 row in 40s"]
    now[0] = 200.0  # a closed bar is forgotten: a new one with its uuid starts its own clock
    assert bars(_bar(5, 10, closed=True)) == "dataset_12_0: 5 row"


@pytest.fixture
def bar_manager():
    """Ray's tqdm_ray manager with a recorder as its own `process_state_update` (what Ray would draw), restored
    afterwards."""
    from ray.experimental import tqdm_ray

    manager = tqdm_ray.instance()
    original = manager.process_state_update
    drawn = []
    manager.process_state_update = drawn.append
    yield manager, drawn
    manager.process_state_update = original


_OPERATOR = "- MapBatches(RowMaker): Tasks: 8; Actors: 4; Queued blocks: 67 (0.0B)"


def test_off_a_terminal_rays_bars_go_to_the_log_file_not_the_console(routing, bar_manager, tmp_path):
    project_console = routing[2]
    manager, drawn = bar_manager
    path = tmp_path / "run.log"
    logs.setup_logging(log_file=path)
    assert sort_progress_bars(terminal=False) == "file"
    manager.process_state_update(_bar(400, 944, desc=_OPERATOR, uuid="op"))  # what the driver does with a bar
    manager.process_state_update(_bar(944, 944, closed=True))
    for h in logging.getLogger().handlers:
        h.flush()
    assert project_console.getvalue() == "" and drawn == []
    assert f"INFO {PROGRESS_BARS_LOGGER}: dataset_12_0: 944 row" in path.read_text()


def test_without_a_log_file_rays_bars_are_the_projects_data_lines(routing, bar_manager):
    project_console = routing[2]
    manager, drawn = bar_manager
    assert sort_progress_bars(terminal=False) == "console"
    manager.process_state_update(_bar(944, 944, closed=True))
    assert project_console.getvalue().startswith("[data] dataset_12_0: 944 row\n") and drawn == []


def test_on_a_terminal_one_live_bar_per_dataset_and_verbose_gives_rays_manager_back(routing, bar_manager, tmp_path):
    manager, drawn = bar_manager
    logs.setup_logging(log_file=tmp_path / "run.log")
    assert sort_progress_bars(terminal=True) == "live"
    dataset, operator = _bar(1, 944), _bar(400, 944, desc=_OPERATOR, uuid="op")
    manager.process_state_update(dataset)
    manager.process_state_update(operator)
    assert drawn == [dataset]  # the operators' bars are left out; the dataset's is Ray's live bar
    assert routing[2].getvalue() == ""
    logs.setup_logging(verbose=True)
    assert sort_progress_bars(terminal=True) == "ray"
    assert manager.process_state_update == drawn.append


# a driver that starts its own local Ray (the test session's is up already) with the project's console, as
# `mrcnn-cli train` does (Ray first imported by `init_ray`, after the log file is set), and a Ray task that runs a
# Ray Data job and says one project line, as the stages of `mrcnn-cli run` do
_DRIVER = """
import sys, time
from pipelines.infra import logs
from pipelines.infra.ray_env import init_ray

logs.setup_logging(log_file=sys.argv[1])
init_ray(num_cpus=2)
import ray

@ray.remote(num_cpus=0)
def stage():
    from pipelines.infra.logs import get_logger, setup_logging
    setup_logging()
    get_logger("evaluate").info("inference: 24/24 images")
    return ray.data.range(24, override_num_blocks=3).map_batches(lambda b: b).materialize().count()

assert ray.get(stage.remote()) == 24
time.sleep(3)  # the workers' last bar states reach the driver
ray.shutdown()
"""


@pytest.mark.slow
def test_off_a_terminal_a_local_rays_start_up_and_bars_go_to_the_log_file(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    path = tmp_path / "run.log"
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(path)], cwd=repo, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)  # stderr a pipe: not a terminal
    assert done.returncode == 0, done.stderr
    console = done.stderr.splitlines()
    assert console == ["[evaluate] inference: 24/24 images"], done.stderr  # our line only
    text = path.read_text()
    assert "Started a local Ray instance" in text
    assert f"INFO {PROGRESS_BARS_LOGGER}: dataset_" in text  # Ray Data's bars, as lines

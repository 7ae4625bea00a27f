"""The project's console lines: one logger tree (`mrcnn.*`), one format, set up once per process.

Every stage speaks through `get_logger(stage)`, e.g. `get_logger("train").info("resuming from %s", uri)`, which
prints `[train] resuming from ...` on stderr. `setup_logging()` is idempotent and is called by the CLI on the
driver and by code that runs in Ray workers (the train loop), whose stderr Ray forwards to the driver's console.
The `mrcnn` logger does not propagate to the root logger, so the project's lines keep their format whatever a
library does to the root logger, and libraries' records never take the project's format.

The console is the project's: `setup_logging(log_file=PATH)` sends the libraries' records (Ray, Ray Data, MLflow,
...) and Python warnings to PATH instead of the terminal, unless `verbose=True`; the project's lines go to both.
What Ray forwards from its workers is sorted the same way by `pipelines.infra.ray_env` (`is_project_line`), and
Ray's progress bars too (`sort_progress_bars`): one live bar per dataset on a terminal; elsewhere (a Ray job's
log, CI, `| tee`) lines in the log file, so that the console keeps the project's own progress lines.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from pathlib import Path

ROOT_LOGGER = "mrcnn"
FORMAT = "[%(stage)s] %(message)s"
LEVEL_ENV = "MRCNN_LOG_LEVEL"  # e.g. DEBUG; default INFO
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# a line in the project's format, `[stage] message` (stage names are lower case; Ray's and glog's own lines open
# with a timestamp, `[2025-...`, or a pid prefix, and never match)
_PROJECT_LINE = re.compile(r"^\[[a-z][a-z0-9_.-]*\] ")
_routing: dict[str, object] = {"log_file": None, "verbose": False}  # what `setup_logging` was last told


class _StageFormatter(logging.Formatter):
    """`[stage] message`, with `warning: ` / `error: ` before the message above INFO."""

    def format(self, record: logging.LogRecord) -> str:
        record.stage = record.name.split(".", 1)[1] if "." in record.name else record.name
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            prefix = f"[{record.stage}] "
            text = prefix + record.levelname.lower() + ": " + text[len(prefix):]
        return text


class _ConsoleHandler(logging.StreamHandler):
    """A StreamHandler that writes to the stream given, or to whatever `sys.stderr` is at the time of each record
    (so redirections made after set-up, pytest's capture among them, are honoured)."""

    def __init__(self, stream=None):
        super().__init__(stream)
        self._fixed = stream

    @property
    def stream(self):
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value):
        self._fixed = value


def setup_logging(level: int | str | None = None, *, stream=None, log_file: str | Path | None = None,
                  verbose: bool | None = None) -> logging.Logger:
    """Give the `mrcnn` logger its one console handler (stderr by default); returns it. Idempotent: a second call
    only changes the level (and the stream, when given).

    With `log_file`, the libraries' records and Python warnings go to that file and no longer reach the console
    (unless `verbose`); the project's lines are written there too, for context. See `route_library_logs`."""
    logger = logging.getLogger(ROOT_LOGGER)
    level = level or os.environ.get(LEVEL_ENV, "INFO")
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    logger.propagate = False
    handler = next((h for h in logger.handlers if getattr(h, "_mrcnn", False)), None)
    if handler is None:
        handler = _ConsoleHandler(stream)
        handler._mrcnn = True  # type: ignore[attr-defined]
        handler.setFormatter(_StageFormatter(FORMAT))
        logger.addHandler(handler)
    elif stream is not None:
        handler.stream = stream
    if log_file is not None or verbose is not None:
        route_library_logs(log_file, verbose=verbose)
    return logger


def route_library_logs(log_file: str | Path | None = None, *, verbose: bool | None = None) -> Path | None:
    """Send the records of every logger but the project's, and Python warnings, to the log file, and take the
    libraries' own console handlers away unless verbose. Called again after a library configures its loggers
    (Ray at `ray.init`, Ray Data and MLflow on import): it keeps no state but the file and the flag, so calls
    compose. Returns the log file (None: none set)."""
    if log_file is not None:
        _routing["log_file"] = Path(log_file).resolve()
    if verbose is not None:
        _routing["verbose"] = verbose
    path = _routing["log_file"]
    if path is None:
        return None
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_mrcnn_file", None) == str(path)), None)
    if handler is None:
        for old in [h for h in root.handlers if getattr(h, "_mrcnn_file", None)]:
            root.removeHandler(old)
            old.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, delay=True)
        handler._mrcnn_file = str(path)  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        root.addHandler(handler)
        project = logging.getLogger(ROOT_LOGGER)
        for old in [h for h in project.handlers if getattr(h, "_mrcnn_file", None)]:
            project.removeHandler(old)
        project.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    if _routing["verbose"]:
        return path
    logging.captureWarnings(True)  # warnings.warn -> the `py.warnings` logger -> the root's file handler
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name == ROOT_LOGGER or name.startswith(ROOT_LOGGER + "."):
            continue
        consoles = [h for h in logger.handlers if _is_console(h)]
        for h in consoles:
            logger.removeHandler(h)
        if consoles:
            logger.propagate = True  # its records reach the file through the root
    terminal = {id(sys.stdout), id(sys.stderr), id(sys.__stdout__), id(sys.__stderr__)}
    for h in [h for h in root.handlers if _is_console(h) and id(h.stream) in terminal]:
        root.removeHandler(h)  # a library's basicConfig; the root's other handlers (pytest's caplog) stay
    return path


def log_file() -> Path | None:
    """The file the libraries' records go to, once `setup_logging(log_file=...)` named one."""
    return _routing["log_file"]  # type: ignore[return-value]


def verbose() -> bool:
    """Whether the libraries may write to the console (no log file named, or `--verbose`)."""
    return bool(_routing["verbose"]) or _routing["log_file"] is None


def is_project_line(line: str) -> bool:
    """`[stage] message`: a line of the project's own logging (from a Ray worker's forwarded output)."""
    return bool(_PROJECT_LINE.match(line))


def progress(done: int, total: int, *, rate: float, unit: str, eta: float | None = None, width: int = 24) -> str:
    """A progress bar as one log line (Ray forwards a worker's lines, not carriage returns):
    `[#########---------------] 120/320 (37%) 3.2 img/s ETA 1m02s`; the ETA is `eta` seconds when given, else
    what is left at `rate` items per second."""
    total = max(total, 1)
    filled = min(width, round(width * done / total))
    left = eta if eta is not None else (total - done) / rate if rate > 0 else float("inf")
    return (f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total} ({100 * done // total}%) "
            f"{rate:.1f} {unit} ETA {format_seconds(left)}")


def format_seconds(seconds: float) -> str:
    """12 -> `12s`, 125 -> `2m05s`, 3725 -> `1h02m`; `?` when unknown."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _is_console(handler: logging.Handler) -> bool:
    """A handler writing to a terminal stream: a StreamHandler but not a file, not ours, not an in-memory
    capture (pytest's)."""
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and not getattr(handler, "_mrcnn", False) and not isinstance(handler.stream, io.StringIO))


def get_logger(stage: str) -> logging.Logger:
    """The logger of one stage (`train`, `preprocess`, `evaluate`, `run`, ...): `mrcnn.<stage>`."""
    return logging.getLogger(f"{ROOT_LOGGER}.{stage}")

"""The project's console lines: one logger tree (`mrcnn.*`), one format, set up once per process.

Every stage speaks through `get_logger(stage)`, e.g. `get_logger("train").info("resuming from %s", uri)`, which
prints `[train] resuming from ...` on stderr. `setup_logging()` is idempotent and is called by the CLI on the
driver and by code that runs in Ray workers (the train loop), whose stderr Ray forwards to the driver's console.
The `mrcnn` logger does not propagate to the root logger, so the project's lines keep their format whatever a
library does to the root logger, and libraries' records never take the project's format.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT_LOGGER = "mrcnn"
FORMAT = "[%(stage)s] %(message)s"
LEVEL_ENV = "MRCNN_LOG_LEVEL"  # e.g. DEBUG; default INFO


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


def setup_logging(level: int | str | None = None, *, stream=None) -> logging.Logger:
    """Give the `mrcnn` logger its one console handler (stderr by default); returns it. Idempotent: a second call
    only changes the level (and the stream, when given)."""
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
    return logger


def get_logger(stage: str) -> logging.Logger:
    """The logger of one stage (`train`, `preprocess`, `evaluate`, `run`, ...): `mrcnn.<stage>`."""
    return logging.getLogger(f"{ROOT_LOGGER}.{stage}")

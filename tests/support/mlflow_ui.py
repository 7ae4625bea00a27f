"""A real `mlflow server` on 127.0.0.1 and headless Chromium for the MLflow UI tests
(tests/pipelines/infra/test_mlflow_server.py, tests/pipelines/training/test_tune_view.py): the session's one
server is the `mlflow_server` fixture of tests/conftest.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

MLFLOW = Path(sys.executable).parent / "mlflow"
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}  # a closed network: no phoning home


@dataclass
class Server:
    url: str
    root: Path
    process: subprocess.Popen

    def log_tail(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll /health until it answers 200; the server takes ~20 s to import and migrate its database here."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(root: Path) -> Iterator[Server]:
    """A real tracking server on a free local port: SQLite backend, artifacts stored under `root` and served
    through it (`mlflow-artifacts:/`). Started here, waited for by its users (`wait_ready`: it boots while Ray
    starts), killed with its process group at the end."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")} | QUIET
    # no job runner: it serves GenAI features (judges, trace archival) with seven worker processes of its own
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(root / "server.log", "wb") as log:
        process = subprocess.Popen(
            [
                str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination", str(root / "artifacts"),
            ],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield Server(f"http://127.0.0.1:{port}", root, process)
    finally:
        # its own session: the group holds uvicorn's worker (and any job runner) as well as the CLI process
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium() -> str:
    """The installed chromium; skips without one (.ci/run installs Debian's: a test installs nothing)."""
    found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium is not installed (.ci/run installs it with apt-get)")
    return found


def render(chromium: str, url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000", *extra, url],
        capture_output=True, text=True, timeout=180,
    )


def visible_text(html: str) -> str:
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"<[^>]+>", " ", html).replace("&nbsp;", " ")

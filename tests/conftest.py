"""Shared fixtures: one local Ray per pytest session, paths to the team's reference data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.s3 import S3_TEST_ENV

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: the keywords hold the names of the folders above a test too, and
        # tests/gpu's cpu cases (tests/support/devices.py) run everywhere
        if item.get_closest_marker("gpu"):
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread: on two shared cores, more threads spin against each other (10x slower here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def project_log(caplog):
    """caplog for the project's own lines: the `mrcnn` logger does not propagate to the root, where caplog
    listens, so its handler is attached there directly. `project_log.messages` are the lines said."""
    import logging

    logger = logging.getLogger("mrcnn")
    logger.addHandler(caplog.handler)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    # as setup_logging leaves it: a line also propagated to the root would reach caplog's root handler twice
    # (it did in a test run alone, before any setup_logging call)
    logger.propagate = False
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The team's reference data (../shared/data); tests using it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` on 127.0.0.1 for the session's UI tests (tests/support/mlflow_ui.py); each test
    module logs to its own experiment. Its users call `wait_ready()` (it boots while Ray starts)."""
    from tests.support.mlflow_ui import running_server

    with running_server(tmp_path_factory.mktemp("mlflow_server")) as server:
        yield server


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session, with more logical CPUs than the 2 real ones so that
    Ray Data and Ray Train workers can run side by side (else a dataset job can hang waiting for CPU).

    Its workers carry placeholder AWS credentials (tests/support/s3.py): the driver's environment does not reach
    workers already running, and pyarrow without credentials sends unsigned requests, which the local S3 server
    refuses for objects the driver wrote. No test reaches real AWS."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(
            num_cpus=6,
            include_dashboard=False,
            ignore_reinit_error=True,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO), **S3_TEST_ENV}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """A small synthetic COCO-format dataset shared by the pipeline tests (12 train, 6 val images)."""
    from pipelines.data.synth import make_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(out, train=12, val=6, seed=0)
    return out


@pytest.fixture(scope="session")
def synth_shards(synth_dataset, ray_session, tmp_path_factory) -> str:
    """`synth_dataset` preprocessed at the `shapes` preset (train2017 and val2017)."""
    from mrcnn.config import shapes
    from pipelines.data.coco import split_paths
    from pipelines.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("shards")
    splits = [(s, *split_paths(str(synth_dataset), s)) for s in ("train2017", "val2017")]
    preprocess(shapes(), splits=splits, out=str(out), progress=False, max_workers=2)
    return str(out)

"""MLflow tracking shared by every stage (docs/design.md, "MLflow").

The tracking URI comes from `MLFLOW_TRACKING_URI`, else MLflow's own local default (SQLite `mlflow.db` in the
working directory), made absolute on the driver so that Ray workers, whose working directory differs, log
to the same store. The driver creates runs; workers attach to them by run id. An experiment this module
creates in a SQLite store keeps its artifacts beside the database (`<db dir>/mlartifacts/`), not in MLflow's
default `./mlruns` of whatever the working directory is, and opens in the UI's model-training view.

MLflow is imported when a function is called, not with this module: the training loop imports it, and the
GPU tests and benchmarks run it on machines without MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs

from pipelines.infra.logs import get_logger
from pipelines.infra.storage import filesystem_for, is_uri

DEFAULT_EXPERIMENT = "mrcnn-pipeline"
# the experiment tag MLflow 3's UI reads to choose the experiment page's view ("genai_development" opens the GenAI
# overview, which shows no runs table); the value its "Model training" choice stores
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# MLflow 3's runs table shows Source, Models and Dataset until someone picks columns, and keeps that pick in the
# browser. A "shared view" lives with the experiment instead: the experiment tag `mlflow.sharedViewState.<key>`
# holds the table's state as JSON and the address `?viewStateShareKey=<key>` opens it (what the UI's "Share"
# button makes). Ours shows each pipeline's headline numbers, the metrics its parent run carries (pipelines/dag.py)
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RUNS_VIEW_KEY = "pipelines"
RUNS_TABLE_METRICS = ("segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50", "train_images_per_s", "time_total_s")


def runs_view_state() -> str:
    """The runs table's state of our shared view (JSON): the headline metrics as columns, after the run's
    models; every other setting is the UI's default."""
    columns = ["attributes.`Models`", *(f"metrics.`{m}`" for m in RUNS_TABLE_METRICS)]
    return json.dumps({"selectedColumns": columns}, separators=(",", ":"))


def resolve_tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


_FLUENT_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def fluent_store(tracking_uri: str | None) -> Iterator[None]:
    """MLflow's fluent API (log_model, register_model, loading runs:/ and models:/ URIs) pointed at `tracking_uri`,
    tracking and registry, for the block; then as before. `mlflow.set_tracking_uri` also writes
    MLFLOW_TRACKING_URI into os.environ, which would otherwise become the default store of every later stage of
    this process (`resolve_tracking_uri`). None: nothing changes."""
    if not tracking_uri:
        yield
        return
    import mlflow

    saved = {name: os.environ.get(name) for name in _FLUENT_ENV}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for name, value in saved.items():  # set_registry_uri(None) leaves its variable behind
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on these runs, bound to 127.0.0.1 (never on all interfaces): this
    environment's own `mlflow` by its absolute path, so that it works as printed from a fresh shell."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    mlflow = Path(sys.executable).parent / "mlflow"
    program = mlflow if mlflow.is_file() else "mlflow"
    return f"{program} ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def ui_url(tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT, base: str = "http://127.0.0.1:5000",
           view: str = RUNS_VIEW_KEY) -> str:
    """The address of the experiment's runs table, in our shared view (the headline metrics as columns), in the
    UI `ui_command` starts (`base`: the server for an http(s) store). MLflow 3.17's UI picks the page's view
    from the address (`workflowType`, remembered by the browser afterwards), not from the experiment's tag;
    without it the page opens on the GenAI overview."""
    base = tracking_uri if tracking_uri.startswith(("http://", "https://")) else base
    experiment_id = ensure_experiment(tracking_uri, experiment)
    # the shared view applies on the runs page's own address (`/runs`), not on the experiment's
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={view}")


def artifact_root(tracking_uri: str) -> str | None:
    """Where an experiment created in this store keeps its artifacts: `<db dir>/mlartifacts` for a SQLite file
    (MLflow's default would be `./mlruns` under the working directory of the process that creates it); None
    (the store's own choice) for a server, which proxies or assigns them, and for other stores."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if str(db) != ":memory:":
            return (db.parent.resolve() / "mlartifacts").as_uri()
    return None


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient  # see the module docstring: MLflow only when used

    from pipelines.infra.logs import route_library_logs

    route_library_logs()  # importing MLflow gave its logger a console handler
    return MlflowClient(tracking_uri)


def ensure_experiment(tracking_uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    """The id of experiment `name`, created when missing with its artifacts under the store (`artifact_root`),
    the model-training view (`EXPERIMENT_KIND_TAG`) and our runs table's shared view (`RUNS_VIEW_KEY`; added
    to an existing experiment that lacks it or holds an older one)."""
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    view_tag, view = SHARED_VIEW_TAG_PREFIX + RUNS_VIEW_KEY, runs_view_state()
    if experiment is not None:
        if experiment.tags.get(view_tag) != view:
            client.set_experiment_tag(experiment.experiment_id, view_tag, view)
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(tracking_uri),
                                    tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND, view_tag: view})


def create_run(
    tracking_uri: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create a run (nested under `parent_run_id` when given) and return its id; it stays RUNNING
    until `finish_run`."""
    client = _client(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, experiment)
    all_tags = {"mlflow.source.name": "mrcnn-pipeline", "code_version": code_version(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def finish_run(tracking_uri: str, run_id: str, *, failed: bool = False, status: str | None = None) -> None:
    """End a run: FINISHED, FAILED (`failed`) or `status` (KILLED: a sweep's trial its scheduler stopped)."""
    _client(tracking_uri).set_terminated(run_id, status=status or ("FAILED" if failed else "FINISHED"))


def find_runs(tracking_uri: str, experiment: str, tags: dict[str, str]) -> list[str]:
    """The ids of the runs of `experiment` that carry every one of `tags` (oldest first)."""
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([found.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"])
    return [r.info.run_id for r in runs]


def set_runs_view(tracking_uri: str, experiment: str, key: str, *, params: list[str], metrics: list[str],
                  search_filter: str = "", order_by: str = "", ascending: bool = True) -> None:
    """A shared view of the runs table named `key` (opened by `ui_url(..., view=key)`): `params` and `metrics` as
    its columns (a sweep's searched settings and its metric); where given, the runs `search_filter` finds
    (MLflow's search syntax, the table's search box) as its rows, sorted by column `order_by`. Sorted by a column
    the table lists nested runs on their own rows; by date (the default) it folds them under their parent run,
    and a shared view cannot unfold it (MLflow's UI leaves `runsExpanded` out of one)."""
    columns = [*(f"params.`{p}`" for p in params), *(f"metrics.`{m}`" for m in metrics)]
    state: dict[str, Any] = {"selectedColumns": columns}
    if search_filter:
        state["searchFilter"] = search_filter
    if order_by:
        state.update(orderByKey=order_by, orderByAsc=ascending)
    experiment_id = ensure_experiment(tracking_uri, experiment)
    _client(tracking_uri).set_experiment_tag(experiment_id, SHARED_VIEW_TAG_PREFIX + key,
                                             json.dumps(state, separators=(",", ":")))


CHAMPION = "champion"  # the alias `register_model` moves to the version it registers


def register_model(tracking_uri: str, run_id: str, name: str, *, tags: dict[str, Any] | None = None,
                   alias: str = CHAMPION) -> int:
    """Register the run's logged model (`runs:/ID/model`) in the Model Registry as a new version of `name` (created
    when missing), with `tags` on the version, and point `alias` at it (`models:/NAME@champion`); returns the
    version number."""
    import mlflow

    client = _client(tracking_uri)
    # mlflow.register_model resolves runs:/ID/model to the logged model (MLflow 3 keeps it outside the run's
    # artifacts); a version created by the client from the runs:/ URI would point at no MLmodel
    with fluent_store(tracking_uri):
        version = mlflow.register_model(f"runs:/{run_id}/model", name,
                                        tags={k: _param_value(v) for k, v in (tags or {}).items()})
    client.set_registered_model_alias(name, alias, version.version)
    get_logger("mlflow").info("registered %s version %s (models:/%s@%s)", name, version.version, name, alias)
    return int(version.version)


def set_tag(tracking_uri: str, run_id: str, key: str, value: str) -> None:
    _client(tracking_uri).set_tag(run_id, key, value)


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param  # see the module docstring

    client = _client(tracking_uri)
    items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric  # see the module docstring

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    client = _client(tracking_uri)
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[float]:
    """The values logged for metric `key` in run `run_id`, in step order."""
    history = _client(tracking_uri).get_metric_history(run_id, key)
    return [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def log_artifact(tracking_uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Log a local file or directory, or one given as a URI (`s3://...`, `file:///...`: copied to a temporary
    directory first, as MLflow logs local files only)."""
    client = _client(tracking_uri)
    path = os.fspath(path)
    if is_uri(path):
        filesystem, inner = filesystem_for(path)
        inner = inner.rstrip("/")
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, inner.rpartition("/")[2] or "artifact")
            if filesystem.get_file_info(inner).type == pafs.FileType.Directory:
                # made here: pyarrow's copy_files makes the folders it lists, not the destination itself, so a
                # directory without subdirectories (a checkpoint: state.pt, meta.json) found nowhere to go
                os.makedirs(local)
            # a file, or a directory copied recursively
            pafs.copy_files(inner, local, source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
            log_artifact(tracking_uri, run_id, local, artifact_path)
        return
    if Path(path).is_dir():
        client.log_artifacts(run_id, path, artifact_path)
    else:
        client.log_artifact(run_id, path, artifact_path)


def code_version() -> str:
    """The git commit of the code when run from a checkout (with '-dirty' if modified), else the package version."""
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        if sha:
            dirty = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass

    try:
        return version("mrcnn-pipeline")
    except PackageNotFoundError:
        return "unknown"


def _param_value(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text[:6000]


__all__ = [
    "DEFAULT_EXPERIMENT",
    "EXPERIMENT_KIND_TAG",
    "MODEL_TRAINING_KIND",
    "RUNS_TABLE_METRICS",
    "RUNS_VIEW_KEY",
    "SHARED_VIEW_TAG_PREFIX",
    "artifact_root",
    "code_version",
    "create_run",
    "ensure_experiment",
    "find_runs",
    "finish_run",
    "log_artifact",
    "log_metrics",
    "log_params",
    "metric_history",
    "set_runs_view",
    "set_tag",
    "resolve_tracking_uri",
    "runs_view_state",
    "ui_command",
    "ui_url",
]

"""MLflow helpers: artifacts given as URIs are logged like local ones."""

from mlflow.tracking import MlflowClient

from pipelines.infra import tracking


def test_log_artifact_of_a_file_uri_directory_and_file(tmp_path):
    # a checkpoint directory as train.py logs it when storage is a URI: MLflow only logs local files, so the
    # helper copies it first; the logged tree and bytes must be the source's
    src = tmp_path / "store/run/checkpoint_000002"
    (src / "sub").mkdir(parents=True)
    (src / "state.pt").write_bytes(b"\x00\x01weights")
    (src / "meta.json").write_text('{"step": 2}')
    (src / "sub/extra.txt").write_text("x")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "art"))).info.run_id
    tracking.log_artifact(uri, run_id, f"file://{src}", "checkpoint")
    tracking.log_artifact(uri, run_id, f"file://{src}/meta.json", "single")
    logged = {a.path for a in client.list_artifacts(run_id, "checkpoint")}
    assert logged == {"checkpoint/state.pt", "checkpoint/meta.json", "checkpoint/sub"}
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint/sub")] == ["checkpoint/sub/extra.txt"]
    assert [a.path for a in client.list_artifacts(run_id, "single")] == ["single/meta.json"]
    got = client.download_artifacts(run_id, "checkpoint", str(tmp_path / "down"))
    assert open(f"{got}/state.pt", "rb").read() == b"\x00\x01weights"


def test_log_artifact_of_a_uri_directory_without_subdirectories(tmp_path):
    # a checkpoint as Ray Train writes it: two files, no folder inside (pyarrow's copy_files alone made no
    # destination folder for it)
    src = tmp_path / "store/run/checkpoint_000004"
    src.mkdir(parents=True)
    (src / "state.pt").write_bytes(b"w")
    (src / "meta.json").write_text('{"step": 4}')
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "art"))).info.run_id
    tracking.log_artifact(uri, run_id, f"file://{src}", "checkpoint")
    assert {a.path for a in client.list_artifacts(run_id, "checkpoint")} == {"checkpoint/state.pt",
                                                                           "checkpoint/meta.json"}


def test_an_experiment_keeps_its_artifacts_beside_its_sqlite_store_not_in_the_working_directory(tmp_path, monkeypatch):
    """MLflow's default artifact root for a SQLite store is `./mlruns` of the creating process's working
    directory (where `make demo` left one); ours is `<db dir>/mlartifacts`, and the UI opens the experiment in
    its model-training view."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    assert tracking.artifact_root(uri) == (tmp_path / "store" / "mlartifacts").as_uri()
    assert tracking.artifact_root("http://127.0.0.1:5000") is None
    run_id = tracking.create_run(uri, experiment="e", run_name="r")
    picture = tmp_path / "losses.png"
    picture.write_bytes(b"png")
    tracking.log_artifact(uri, run_id, picture, "plots")
    experiment = MlflowClient(uri).get_experiment_by_name("e")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert list((tmp_path / "store" / "mlartifacts").rglob("losses.png"))
    assert list(cwd.iterdir()) == []


def test_the_ui_command_uses_this_environments_mlflow_on_localhost():
    import sys
    from pathlib import Path

    command = tracking.ui_command("sqlite:////x/mlflow.db")
    assert command.startswith(f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri sqlite:////x/mlflow.db")
    assert "--host 127.0.0.1" in command


def test_experiments_carry_the_runs_table_view_and_the_ui_address_opens_it(tmp_path):
    """The shared view (experiment tag `mlflow.sharedViewState.pipelines`): set on a new experiment, added to one
    made without it (an older store), and named by the address the demo prints."""
    import json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    tag = tracking.SHARED_VIEW_TAG_PREFIX + tracking.RUNS_VIEW_KEY
    new = client.get_experiment(tracking.ensure_experiment(uri, "new"))
    columns = json.loads(new.tags[tag])["selectedColumns"]
    assert "metrics.`segm_AP`" in columns and "metrics.`time_total_s`" in columns
    older = client.create_experiment("older", artifact_location=str(tmp_path / "art"))
    assert tag not in client.get_experiment(older).tags
    assert tracking.ensure_experiment(uri, "older") == older
    assert client.get_experiment(older).tags[tag] == tracking.runs_view_state()
    address = tracking.ui_url(uri, "older")
    assert address == (f"http://127.0.0.1:5000/#/experiments/{older}/runs?workflowType=machine_learning"
                       "&viewStateShareKey=pipelines")


def test_the_fluent_store_is_set_for_its_block_and_the_environment_left_as_it_was(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ: without `fluent_store` putting it back,
    registering or logging a model would make that store every later stage's default in the process."""
    import os

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for before in (None, f"sqlite:///{tmp_path / 'other.db'}"):
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            if before is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, before)
        with tracking.fluent_store(uri):
            assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (uri, uri)
            assert os.environ["MLFLOW_TRACKING_URI"] == uri
        assert [os.environ.get(n) for n in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")] == [before, before]
        assert tracking.resolve_tracking_uri() != uri


def test_only_the_fluent_store_points_mlflow_at_a_store():
    """Every other module goes through `tracking.fluent_store` (or a client bound to its URI)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    sources = [p for folder in ("mrcnn", "pipelines") for p in (root / folder).rglob("*.py")]
    callers = sorted(str(p.relative_to(root)) for p in sources
                     if "set_tracking_uri(" in p.read_text() or "set_registry_uri(" in p.read_text())
    assert callers == ["pipelines/infra/tracking.py"], callers

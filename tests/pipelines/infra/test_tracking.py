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

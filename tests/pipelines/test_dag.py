"""The DAG executor on real Ray tasks and a real MLflow store, with small stages whose runs are counted; the work
dir as a local path and as a `file://` URI (the pyarrow.fs path every other URI scheme takes)."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.dag import MARKER, Stage, run_dag
from pipelines.infra.storage import filesystem_for


def _stages(counter: Path, *, lr: float = 0.1, fail_train: bool = False) -> list[Stage]:
    def make(name: str, fail: bool = False):
        def fn(out_dir: str, upstream: dict, parent: str | None) -> dict:
            with open(counter / name, "a") as f:  # one line per execution, from the Ray worker
                f.write("x\n")
            if fail:
                raise RuntimeError(f"injected failure in {name}")
            filesystem, path = filesystem_for(out_dir)  # out_dir is a path or a URI, like the work dir
            with filesystem.open_output_stream(f"{path}/result.txt") as f:
                f.write(name.encode())
            return {"out": out_dir, "upstream": sorted(upstream), "parent": parent}

        return fn

    return [
        Stage("preprocess", {"fingerprint": "abc"}, make("preprocess")),
        Stage("train", {"lr": lr}, make("train", fail_train)),
        Stage("evaluate", {"limit": None}, make("evaluate")),
    ]


def _runs(counter: Path) -> dict[str, int]:
    return {p.name: len(p.read_text().splitlines()) for p in counter.iterdir()}


@pytest.fixture
def env(tmp_path, ray_session):
    counter = tmp_path / "counter"
    counter.mkdir()
    return counter, tmp_path / "work", f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_run_skip_change_fail_resume_force(env, as_uri):
    counter, local_work, uri = env
    work = f"file://{local_work}" if as_uri else local_work  # the same folder either way, inspected locally
    logs: list[str] = []

    first = run_dag(_stages(counter), work, tracking_uri=uri, log=logs.append)
    assert first.ran == ["preprocess", "train", "evaluate"] and first.skipped == []
    assert first.outputs["evaluate"]["upstream"] == ["preprocess", "train"]
    assert first.outputs["train"]["parent"] == first.parent_run_id
    # each stage got its folder in the work dir's own form, and its marker (no temporary left) and output are there
    assert first.outputs["train"]["out"].startswith(f"{work}/train-")
    done = sorted(p.parent.name.split("-")[0] for p in local_work.glob(f"*/{MARKER}"))
    assert done == ["evaluate", "preprocess", "train"] and not list(local_work.glob(f"*/{MARKER}.tmp"))
    assert (local_work / Path(first.outputs["train"]["out"]).name / "result.txt").read_text() == "train"

    second = run_dag(_stages(counter), work, tracking_uri=uri, log=logs.append)
    assert second.ran == [] and second.skipped == ["preprocess", "train", "evaluate"]
    assert sum("skipped" in line for line in logs) == 3  # and says so
    assert _runs(counter) == {"preprocess": 1, "train": 1, "evaluate": 1}

    # a changed training setting reruns train and evaluate, not preprocess
    third = run_dag(_stages(counter, lr=0.2), work, tracking_uri=uri, log=logs.append)
    assert third.ran == ["train", "evaluate"] and third.skipped == ["preprocess"]

    # a failure in train stops evaluate and leaves no marker; the next run resumes at train
    with pytest.raises(Exception, match="injected failure in train"):
        run_dag(_stages(counter, lr=0.3, fail_train=True), work, tracking_uri=uri, log=logs.append)
    assert _runs(counter) == {"preprocess": 1, "train": 3, "evaluate": 2}
    failed_dirs = [d for d in local_work.iterdir() if d.name.startswith("train-") and not (d / MARKER).exists()]
    assert len(failed_dirs) == 1
    resumed = run_dag(_stages(counter, lr=0.3), work, tracking_uri=uri, log=logs.append)
    assert resumed.ran == ["train", "evaluate"] and resumed.skipped == ["preprocess"]

    forced = run_dag(_stages(counter, lr=0.3), work, tracking_uri=uri, force="train", log=logs.append)
    assert forced.ran == ["train", "evaluate"] and forced.skipped == ["preprocess"]
    assert _runs(counter) == {"preprocess": 1, "train": 5, "evaluate": 4}

    # MLflow: one parent run per pipeline run, failed ones marked FAILED, stage keys as params
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("mrcnn-pipeline").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED"] + ["FINISHED"] * 5
    parent = client.get_run(forced.parent_run_id)
    assert parent.data.params["train.key"] and parent.data.params["preprocess.out"].startswith(f"{work}/preprocess-")


def test_unknown_force_stage(env):
    counter, work, uri = env
    with pytest.raises(ValueError, match="--force 'trian'"):
        run_dag(_stages(counter), work, tracking_uri=uri, force="trian")


def test_report_files_written_locally_reach_a_uri_work_dir(tmp_path):
    """Stages that write with local file APIs (evaluate's report) under a URI work dir."""
    from pipelines.dag import _local_dir

    uri = f"file://{tmp_path / 'out'}"
    with _local_dir(uri) as local:
        assert "://" not in local and not Path(local).is_relative_to(tmp_path)
        (Path(local) / "metrics.json").write_text('{"AP": 0.5}')
        (Path(local) / "plots").mkdir()
        (Path(local) / "plots" / "pr.png").write_bytes(b"png")
    assert (tmp_path / "out" / "metrics.json").read_text() == '{"AP": 0.5}'
    assert (tmp_path / "out" / "plots" / "pr.png").read_bytes() == b"png"
    plain = str(tmp_path / "plain")
    with _local_dir(plain) as local:
        assert local == plain  # a local path is used as it is

"""The DAG executor on real Ray tasks and a real MLflow store, with small stages whose runs are counted."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.dag import MARKER, Stage, run_dag


def _stages(counter: Path, *, lr: float = 0.1, fail_train: bool = False) -> list[Stage]:
    def make(name: str, fail: bool = False):
        def fn(out_dir: str, upstream: dict, parent: str | None) -> dict:
            with open(counter / name, "a") as f:  # one line per execution, from the Ray worker
                f.write("x\n")
            if fail:
                raise RuntimeError(f"injected failure in {name}")
            (Path(out_dir) / "result.txt").write_text(name)
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


def test_run_skip_change_fail_resume_force(env):
    counter, work, uri = env
    logs: list[str] = []

    first = run_dag(_stages(counter), work, tracking_uri=uri, log=logs.append)
    assert first.ran == ["preprocess", "train", "evaluate"] and first.skipped == []
    assert first.outputs["evaluate"]["upstream"] == ["preprocess", "train"]
    assert first.outputs["train"]["parent"] == first.parent_run_id

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
    failed_dirs = [d for d in work.iterdir() if d.name.startswith("train-") and not (d / MARKER).exists()]
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
    assert parent.data.params["train.key"] and parent.data.params["preprocess.out"].startswith(str(work))


def test_unknown_force_stage(env):
    counter, work, uri = env
    with pytest.raises(ValueError, match="--force 'trian'"):
        run_dag(_stages(counter), work, tracking_uri=uri, force="trian")

"""The DAG executor on real Ray tasks and a real MLflow store, with small stages whose runs are counted; the work
dir as a local path and as a `file://` URI (the pyarrow.fs path every other URI scheme takes)."""

import dataclasses
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.dag import MARKER, Stage, run_dag
from pipelines.infra.context import RunContext
from pipelines.infra.storage import filesystem_for


def _stages(counter: Path, *, lr: float = 0.1, fail_train: bool = False) -> list[Stage]:
    def make(name: str, fail: bool = False):
        def fn(out_dir: str, upstream: dict, ctx: RunContext) -> dict:
            with open(counter / name, "a") as f:  # one line per execution, from the Ray worker
                f.write("x\n")
            if fail:
                raise RuntimeError(f"injected failure in {name}")
            filesystem, path = filesystem_for(out_dir)  # out_dir is a path or a URI, like the work dir
            with filesystem.open_output_stream(f"{path}/result.txt") as f:
                f.write(name.encode())
            return {"out": out_dir, "upstream": sorted(upstream), "parent": ctx.parent_run_id}

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
def test_run_skip_change_fail_resume_force(env, as_uri, project_log):
    counter, local_work, uri = env
    work = f"file://{local_work}" if as_uri else local_work  # the same folder either way, inspected locally

    first = run_dag(_stages(counter), work, RunContext(tracking_uri=uri))
    assert first.ran == ["preprocess", "train", "evaluate"] and first.skipped == []
    assert first.outputs["evaluate"]["upstream"] == ["preprocess", "train"]
    assert first.outputs["train"]["parent"] == first.parent_run_id
    # each stage got its folder in the work dir's own form, and its marker (no temporary left) and output are there
    assert first.outputs["train"]["out"].startswith(f"{work}/train-")
    done = sorted(p.parent.name.split("-")[0] for p in local_work.glob(f"*/{MARKER}"))
    assert done == ["evaluate", "preprocess", "train"] and not list(local_work.glob(f"*/{MARKER}.tmp"))
    assert (local_work / Path(first.outputs["train"]["out"]).name / "result.txt").read_text() == "train"

    second = run_dag(_stages(counter), work, RunContext(tracking_uri=uri))
    assert second.ran == [] and second.skipped == ["preprocess", "train", "evaluate"]
    assert sum("skipped" in line for line in project_log.messages) == 3  # and says so
    assert _runs(counter) == {"preprocess": 1, "train": 1, "evaluate": 1}

    # a changed training setting reruns train and evaluate, not preprocess
    third = run_dag(_stages(counter, lr=0.2), work, RunContext(tracking_uri=uri))
    assert third.ran == ["train", "evaluate"] and third.skipped == ["preprocess"]

    # a failure in train stops evaluate and leaves no marker; the next run resumes at train
    with pytest.raises(Exception, match="injected failure in train"):
        run_dag(_stages(counter, lr=0.3, fail_train=True), work, RunContext(tracking_uri=uri))
    assert _runs(counter) == {"preprocess": 1, "train": 3, "evaluate": 2}
    failed_dirs = [d for d in local_work.iterdir() if d.name.startswith("train-") and not (d / MARKER).exists()]
    assert len(failed_dirs) == 1
    resumed = run_dag(_stages(counter, lr=0.3), work, RunContext(tracking_uri=uri))
    assert resumed.ran == ["train", "evaluate"] and resumed.skipped == ["preprocess"]

    forced = run_dag(_stages(counter, lr=0.3), work, RunContext(tracking_uri=uri), force="train")
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
        run_dag(_stages(counter), work, RunContext(tracking_uri=uri), force="trian")


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


# ------------------------------------------------------------------------------------------ the real stages' keys
def _other_value(config, key: str):
    """`config` with the setting `key` changed to another valid value (the first candidate the config accepts)."""
    import typing
    from dataclasses import replace

    from mrcnn.config import ConfigError, choices

    if "." not in key:
        return replace(config, **{key: getattr(config, key) + "-other"})
    section, name = key.split(".")
    part = getattr(config, section)
    value = getattr(part, name)

    def candidates(v, hint=None):
        if hint is not None and choices(hint):
            return [c for c in choices(hint) if c != v]
        if isinstance(v, bool):
            return [not v]
        if isinstance(v, int):
            return [v * 2, v + 1, v - 1]
        if isinstance(v, float):
            return [v / 2, v * 0.9, v + 0.05, v + 1.0]
        if isinstance(v, str):
            return [v + "-other"]
        if isinstance(v, tuple):
            return [(c, *v[1:]) for c in candidates(v[0])] + ([v[:-1]] if len(v) > 1 else [])
        raise AssertionError(f"{key}: no way to change a {type(v).__name__}")

    hint = typing.get_type_hints(type(part))[name]
    if choices(hint) == (value,):
        return None  # a setting with a single allowed value cannot change
    for candidate in candidates(value, hint):
        if candidate == value:
            continue
        try:
            return replace(config, **{section: replace(part, **{name: candidate})})
        except ConfigError:
            continue
    raise AssertionError(f"{key}: no other valid value found for {value!r}")


def test_every_config_field_reruns_exactly_the_stages_it_can_change(synth_dataset, tmp_path):
    """For EVERY field of the typed config (not a sample), the real `pipeline_stages`' keys: a change reruns the
    first stage whose output it can change and everything after it, and nothing before. What can change what:
    the shards depend on the shard fields (what the fingerprint covers, test_config) and the preprocess section;
    evaluation reads the detection and evaluate sections from the pipeline's config (it passes them on);
    anything else is read by training (the model, the loop, and the config the checkpoint carries)."""
    from mrcnn.config import shapes
    from pipelines.dag import PipelineRequest, pipeline_stages, stage_keys

    request = PipelineRequest(dataset=str(synth_dataset))
    ctx = RunContext(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    base = shapes()

    def keys(config):
        return [s.key for s in stage_keys(pipeline_stages(config, request, ctx))]

    before = keys(base)
    assert len(set(before)) == 3
    fields = sorted(base.flat())
    sections = [f for f in dataclasses.fields(base) if dataclasses.is_dataclass(getattr(base, f.name))]
    assert len(fields) == sum(len(dataclasses.fields(getattr(base, s.name))) for s in sections) + 1  # + name
    wrong, fixed = [], []
    for key in fields:
        section = key.split(".", 1)[0]
        if key in base.shard_fields() or section == "preprocess":
            expected = ["preprocess", "train", "evaluate"]
        elif section in ("detection", "evaluate"):
            expected = ["evaluate"]
        else:
            expected = ["train", "evaluate"]
        changed = _other_value(base, key)
        if changed is None:
            fixed.append(key)
            continue
        after = keys(changed)
        rerun = [name for name, a, b in zip(("preprocess", "train", "evaluate"), before, after, strict=True) if a != b]
        if rerun != expected:
            wrong.append(f"{key}: reruns {rerun or 'nothing'}, expected {expected}")
    assert not wrong, "\n".join(wrong)
    assert fixed == ["image.resize_mode"]  # the one setting with a single allowed value


def test_the_pipeline_evaluates_with_its_own_detection_settings(synth_dataset, tmp_path, monkeypatch):
    """A changed detection / evaluate setting reruns evaluate only, so evaluate must use the pipeline's values,
    not those the checkpoint was trained with: the request the stage builds carries them."""
    from mrcnn.config import shapes
    from pipelines import dag

    seen = {}

    def fake_evaluate(request, ctx):  # stands in for the whole stage: only the request it is given matters here
        seen["request"], seen["ctx"] = request, ctx
        raise RuntimeError("stop")

    monkeypatch.setattr(dag, "evaluate", fake_evaluate)
    config = shapes().override(["evaluate.min_confidence=0.1", "detection.nms_threshold=0.4"])
    request = dag.PipelineRequest(dataset=str(synth_dataset))
    ctx = RunContext(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    evaluate_stage = dag.pipeline_stages(config, request, ctx)[2].fn
    upstream = {"preprocess": {"shards": "S"}, "train": {"checkpoint": "C"}}
    with pytest.raises(RuntimeError, match="stop"):
        evaluate_stage(str(tmp_path / "out"), upstream, ctx)
    assert seen["request"].settings.min_confidence == 0.1 and seen["request"].detection.nms_threshold == 0.4
    # the stage's context is the pipeline's, with one inference actor
    assert seen["ctx"] == dataclasses.replace(ctx, workers=1)


def test_init_weights_rerun_train_and_evaluate_and_reach_training(synth_dataset, tmp_path, monkeypatch):
    """`run --init`: without it the keys are what they were; with it (and with another file behind the same name)
    train and evaluate rerun, preprocess does not; the train stage trains from it."""
    import torch

    from mrcnn.config import shapes
    from pipelines import dag

    weights = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    base = dict(dataset=str(synth_dataset))
    ctx = RunContext(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    def keys(**kw):
        return [s.key for s in dag.stage_keys(dag.pipeline_stages(shapes(), dag.PipelineRequest(**base, **kw), ctx))]

    plain, tv = keys(), keys(init=f"torchvision:{weights}")
    assert plain == keys(init=None) and plain[0] == tv[0] and plain[1] != tv[1] and plain[2] != tv[2]
    torch.save({"conv1.weight": torch.ones(1)}, weights)
    assert keys(init=f"torchvision:{weights}")[1] != tv[1]
    seen = {}

    def fake_train(config, request, ctx):
        seen["request"], seen["ctx"] = request, ctx
        raise RuntimeError("stop")

    monkeypatch.setattr(dag, "train", fake_train)
    stages = dag.pipeline_stages(shapes(), dag.PipelineRequest(**base, init=f"torchvision:{weights}"), ctx)
    with pytest.raises(RuntimeError, match="stop"):
        stages[1].fn(str(tmp_path / "out"), {"preprocess": {"shards": "S", "run_id": "r"}}, ctx)
    assert seen["request"].model_path == f"torchvision:{weights}"
    # the train stage's context: the pipeline's, its checkpoints in the stage's folder, tagged with preprocess's run
    out = str(tmp_path / "out")
    assert seen["ctx"] == dataclasses.replace(ctx, storage=out, tags={"preprocess_run_id": "r"})


def test_another_shard_schema_reruns_every_stage(synth_dataset, tmp_path, monkeypatch):
    """A work dir cached by an older shard schema is not reused: its shards would be refused by read_manifest."""
    from mrcnn.config import shapes
    from pipelines import dag

    request = dag.PipelineRequest(dataset=str(synth_dataset))
    ctx = RunContext(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    now = [s.key for s in dag.stage_keys(dag.pipeline_stages(shapes(), request, ctx))]
    monkeypatch.setattr(dag, "SCHEMA_VERSION", dag.SCHEMA_VERSION - 1)
    older = [s.key for s in dag.stage_keys(dag.pipeline_stages(shapes(), request, ctx))]
    assert all(a != b for a, b in zip(now, older, strict=True))


def test_the_pipeline_params_are_the_request_and_context_settings():
    """The parent run's `pipeline.*` params come from the fields of the request (but where the outputs go and
    --force) and the context's compared ones (workers, use_gpu): a new request field is logged without a list."""
    from mrcnn.config import shapes
    from pipelines.dag import PipelineRequest, pipeline_params

    params = pipeline_params(shapes(), PipelineRequest(dataset="d", eval_limit=3, work_dir="w", force="train"),
                             RunContext(workers=2, use_gpu=False, experiment="e", address="ray://x"))
    own = {k.removeprefix("pipeline."): v for k, v in params.items() if k.startswith("pipeline.")}
    assert own == {"dataset": "d", "train_split": "train2017", "val_split": "val2017", "cpus_per_worker": None,
                   "placement_strategy": "PACK", "eval_limit": 3, "init": None, "workers": 2, "use_gpu": False}
    assert params["train.lr"] == shapes().train.lr


def test_a_dataset_without_annotations_is_refused_naming_the_file(tmp_path):
    """Before Ray starts: `run --dataset` on a folder without the split's annotations file."""
    from mrcnn.config import shapes
    from pipelines.dag import PipelineRequest, pipeline_stages
    from pipelines.data.errors import MissingInputError

    with pytest.raises(MissingInputError, match=f"{tmp_path}/annotations/instances_train2017.json: no annotations "
                                                "file for split 'train2017'; --dataset DIR needs"):
        pipeline_stages(shapes(), PipelineRequest(dataset=str(tmp_path)), RunContext())


def test_run_register_registers_the_trained_model_tagged_with_its_evaluation(synth_dataset, tmp_path, monkeypatch,
                                                                                 ray_session):
    """`run --register NAME`: the train stage's MLflow model becomes version 1 of NAME in the registry (a real
    SQLite store), alias champion, tagged with evaluate's headline metrics. The DAG itself stands in (run_dag
    returns the stages' outputs as they would be): what is checked is what run_pipeline does with them."""
    import torch

    from mrcnn.config import shapes
    from mrcnn.model import build_model
    from pipelines import dag
    from pipelines.data.categories import CategoryMap
    from pipelines.infra import tracking
    from pipelines.training.checkpoints import save_checkpoint
    from pipelines.training.train import log_final_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torch.manual_seed(0)
    categories = CategoryMap((1, 2, 3), ("circle", "square", "triangle")).to_dict()
    checkpoint = save_checkpoint(tmp_path / "ckpt", model=build_model(shapes(), num_classes=4), optimizer=None,
                                 scheduler=None, step=0, epoch=0, batch_in_epoch=0,
                                 meta={"config": shapes().to_dict(), "categories": categories, "num_classes": 4})
    run_id = tracking.create_run(uri, run_name="train")
    log_final_model(uri, run_id, str(checkpoint), config=shapes(), num_classes=4)
    metrics = {"segm/AP": 0.25, "segm/AP50": 0.5, "bbox/AP": 0.125, "bbox/AP50": 0.75}
    outputs = {"train": {"run_id": run_id}, "evaluate": {"metrics": metrics}}
    monkeypatch.setattr(dag, "run_dag", lambda *args, **kwargs: dag.DagResult(parent_run_id="p", outputs=outputs))
    dag.run_pipeline(shapes(), dag.PipelineRequest(dataset=str(synth_dataset), register="shapes-champ"),
                     RunContext(tracking_uri=uri))
    version = MlflowClient(uri).get_model_version_by_alias("shapes-champ", tracking.CHAMPION)
    assert int(version.version) == 1 and version.run_id == run_id
    assert {k: float(v) for k, v in version.tags.items() if k in ("segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50")} \
        == {"segm_AP": 0.25, "segm_AP50": 0.5, "bbox_AP": 0.125, "bbox_AP50": 0.75}


# What each request field (and each of the context's compared settings) reruns: a field missing from here fails the
# test below, so a new input is placed on purpose. Not keyed: where the outputs go (work_dir), what to redo (force),
# how the training is placed on the cluster (cpus_per_worker, placement_strategy: the same model either way), and
# the registry name the trained model gets (register).
ALL_STAGES = ["preprocess", "train", "evaluate"]
REQUEST_RERUNS = {
    "dataset": ALL_STAGES, "train_split": ALL_STAGES, "val_split": ALL_STAGES, "eval_limit": ["evaluate"],
    "init": ["train", "evaluate"], "work_dir": [], "force": [], "cpus_per_worker": [], "placement_strategy": [],
    "register": [],  # the Model Registry entry is made after the stages, from train's run
}


def test_every_request_field_is_in_the_keys_of_the_stages_it_changes(synth_dataset, tmp_path):
    """The request's fields as well as the config's: each one changed reruns exactly the stages it can change."""
    import shutil

    import torch

    from mrcnn.config import shapes
    from pipelines.dag import PipelineRequest, pipeline_stages, stage_keys

    assert {f.name for f in dataclasses.fields(PipelineRequest)} == set(REQUEST_RERUNS)
    other = tmp_path / "other"  # the same images and annotations elsewhere (and under other split names)
    shutil.copytree(synth_dataset, other)
    for split in ("train2017", "val2017"):
        shutil.copy(other / f"annotations/instances_{split}.json", other / f"annotations/instances_{split}b.json")
        (other / f"{split}b").symlink_to(other / split)
    weights = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    changed = {"dataset": str(synth_dataset), "train_split": "train2017b", "val_split": "val2017b", "eval_limit": 3,
               "init": f"torchvision:{weights}", "work_dir": str(tmp_path / "elsewhere"), "force": "train",
               "cpus_per_worker": 3.0, "placement_strategy": "SPREAD", "register": "shapes-champ"}
    ctx = RunContext(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    def keys(request, context=ctx):
        return [s.key for s in stage_keys(pipeline_stages(shapes(), request, context))]

    base = PipelineRequest(dataset=str(other), train_split="train2017", val_split="val2017")
    before = keys(base)
    wrong = []
    for name, expected in REQUEST_RERUNS.items():
        after = keys(dataclasses.replace(base, **{name: changed[name]}))
        rerun = [stage for stage, a, b in zip(ALL_STAGES, before, after, strict=True) if a != b]
        if rerun != expected:
            wrong.append(f"{name}: reruns {rerun or 'nothing'}, expected {expected}")
    # the context's compared settings: the number of workers changes the training (the global batch)
    after = keys(base, dataclasses.replace(ctx, workers=ctx.workers + 1))
    if [stage for stage, a, b in zip(ALL_STAGES, before, after, strict=True) if a != b] != ["train", "evaluate"]:
        wrong.append("workers: expected to rerun train and evaluate")
    assert not wrong, "\n".join(wrong)

"""`mrcnn-cli run`: preprocess -> train -> evaluate as a DAG of Ray tasks, cached by fingerprint.

Each stage's output location is keyed by the fingerprint of its inputs and config (`<work>/<stage>-<key>`),
and a completion marker (`_COMPLETE.json`, holding the stage's outputs) is written last. The work dir is a
local path or a URI (`file://`, `s3://`, `gs://`, through pyarrow.fs): on a multi-node cluster it must be
one every node can read, since the stages run wherever Ray places them. A rerun with
nothing changed skips every stage and says so; a changed training setting changes the train and evaluate
keys only; a failed stage leaves no marker, stops the stages after it, and the next run resumes at it.
Not Ray Workflows (deprecated): plain Ray tasks with `num_cpus=0`, since a stage only launches Ray Data or
Ray Train work and must not hold the CPU its own workers wait for (docs/design.md, "Ray").
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs

from mrcnn.config import Config
from pipelines.data.coco import split_paths
from pipelines.data.errors import InputError, MissingInputError
from pipelines.data.preprocess import preprocess
from pipelines.data.shards import SCHEMA_VERSION
from pipelines.evaluation.evaluate import EvaluateRequest, evaluate
from pipelines.infra import tracking
from pipelines.infra.context import RunContext
from pipelines.infra.logs import format_seconds, get_logger, setup_logging
from pipelines.infra.ray_env import cluster_nodes
from pipelines.infra.storage import (
    absolute,
    exists,
    filesystem_for,
    is_uri,
    join_uri,
    read_bytes,
    read_file,
    replace_file,
)
from pipelines.training.model_source import ModelSource
from pipelines.training.train import TrainRequest, train

log = get_logger("run")

MARKER = "_COMPLETE.json"


@dataclass
class Stage:
    """One node: `fn(out_dir, upstream_outputs, ctx) -> outputs dict` (JSON-serialisable); `ctx` is the
    pipeline's run context with the pipeline's MLflow run as its parent run."""

    name: str
    key_inputs: dict[str, Any]  # everything that decides this stage's output, besides its upstream keys
    fn: Callable[[str, dict[str, Any], RunContext], dict[str, Any]]
    key: str = ""
    # the stage's headline numbers for the pipeline's parent run, from its outputs (fresh or from the marker)
    headline: Callable[[dict[str, Any]], dict[str, float]] | None = None


@dataclass
class DagResult:
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    parent_run_id: str | None = None


def stage_keys(stages: list[Stage]) -> list[Stage]:
    """Chain the fingerprints: each key hashes the stage's own inputs and the key before it."""
    previous = ""
    for stage in stages:
        blob = json.dumps({"upstream": previous, "stage": stage.name, **stage.key_inputs}, sort_keys=True, default=str)
        stage.key = hashlib.sha256(blob.encode()).hexdigest()[:12]
        previous = stage.key
    return stages


def completed_outputs(out_dir: str) -> dict[str, Any] | None:
    """The outputs recorded in `out_dir`'s marker (a path or URI), or None when the stage is not complete."""
    filesystem, path = filesystem_for(out_dir)
    marker = f"{path}/{MARKER}"
    if filesystem.get_file_info(marker).type != pafs.FileType.File:
        return None
    return json.loads(read_file(filesystem, marker))["outputs"]


def run_dag(
    stages: list[Stage],
    work_dir: str | Path,
    ctx: RunContext,
    *,
    force: str | None = None,
    run_name: str = "pipeline",
    params: dict[str, Any] | None = None,
) -> DagResult:
    """Run `stages` in order as Ray tasks, skipping those whose marker exists (unless at or after `force`).

    The parent run (in `ctx`'s MLflow experiment) holds `params` (the pipeline's settings), each stage's key and
    output folder, and as metrics each stage's `headline` numbers and its time in this run (`time_<stage>_s`, 0 when
    skipped; and `time_total_s`), so that MLflow's runs table compares pipelines without opening them. Each stage
    gets `ctx` with this run as its parent run."""
    import ray

    names = [s.name for s in stages]
    if force is not None and force not in names:
        raise InputError(f"--force {force!r}: choose one of {', '.join(names)}")
    stage_keys(stages)
    work = absolute(work_dir)  # a URI as it is, a local path made absolute (workers start elsewhere)
    filesystem, work_path = filesystem_for(work)
    filesystem.create_dir(work_path, recursive=True)
    uri = ctx.mlflow_uri()
    parent = ctx.create_run(run_name, {"stage": "pipeline", **{f"key.{s.name}": s.key for s in stages}})
    stage_ctx = replace(ctx, tracking_uri=uri, parent_run_id=parent)  # resolved here: the stages run elsewhere
    result = DagResult(parent_run_id=parent)
    forcing = False
    upstream: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        tracking.log_params(uri, parent, params or {})
        for stage in stages:
            stage_started = time.perf_counter()
            forcing = forcing or stage.name == force
            out_dir = join_uri(work, f"{stage.name}-{stage.key}")  # what the stage writes to: path or URI
            out_path = f"{work_path}/{stage.name}-{stage.key}"  # the same place inside `filesystem`
            done = None if forcing else completed_outputs(out_dir)
            if done is not None:
                log.info("%s: up to date (%s), skipped", stage.name, out_dir)
                result.skipped.append(stage.name)
            else:
                log.info("%s: running -> %s", stage.name, out_dir)
                if exists(filesystem, out_path):
                    filesystem.delete_dir(out_path)  # a failed or forced earlier attempt: start clean
                filesystem.create_dir(out_path, recursive=True)
                task = ray.remote(num_cpus=0, max_retries=0)(_run_stage)
                done = ray.get(task.remote(stage.fn, out_dir, dict(upstream), stage_ctx))
                _write_marker(filesystem, out_path, stage, done)
                result.ran.append(stage.name)
            seconds = time.perf_counter() - stage_started if stage.name in result.ran else 0.0
            if seconds:
                log.info("%s: done in %s", stage.name, format_seconds(seconds))
            upstream[stage.name] = done
            result.outputs[stage.name] = done
            tracking.log_params(uri, parent, {f"{stage.name}.key": stage.key, f"{stage.name}.out": out_dir})
            tracking.log_metrics(uri, parent, {f"time_{stage.name}_s": seconds,
                                               **(stage.headline(done) if stage.headline else {})})
    except Exception:
        log.error("failed after %s", format_seconds(time.perf_counter() - started))
        tracking.finish_run(uri, parent, failed=True)
        raise
    tracking.log_metrics(uri, parent, {"time_total_s": time.perf_counter() - started})
    tracking.finish_run(uri, parent)
    return result


def _run_stage(fn, out_dir: str, upstream: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    setup_logging()  # a Ray worker: the stage's lines reach the driver's console through its stderr
    return fn(out_dir, upstream, ctx)


def _write_marker(filesystem: pafs.FileSystem, out_path: str, stage: Stage, outputs: dict[str, Any]) -> None:
    """Written last, under a temporary name then moved: its presence means the stage is complete. (A rename on
    a local or POSIX filesystem; on object stores a move is copy + delete, and the marker object only appears
    once whole, so a reader never sees half a marker either way.)"""
    blob = json.dumps({"stage": stage.name, "key": stage.key, "outputs": outputs}, indent=1, default=str)
    replace_file(filesystem, f"{out_path}/{MARKER}", blob.encode())


# ------------------------------------------------------------------------------------------ the pipeline
@dataclass(frozen=True)
class PipelineRequest:
    """What `mrcnn-cli run` was asked; the cluster, MLflow, workers and GPUs are the run context's. Every field is
    one of the pipeline's params on its MLflow run (`pipeline_params`) but those marked `compared: False`."""

    dataset: str
    train_split: str = "train2017"
    val_split: str = "val2017"
    work_dir: str = field(default="pipeline_out", metadata={"compared": False})
    force: str | None = field(default=None, metadata={"compared": False})
    cpus_per_worker: float | None = None  # None: the train stage's default (pipelines.training.train)
    placement_strategy: str = "PACK"
    eval_limit: int | None = None
    init: str | None = None  # train from these weights (`train --init`): our checkpoint, or torchvision:FILE
    # register the trained model under this name (alias champion), tagged with evaluate's headline metrics
    register: str | None = field(default=None, metadata={"compared": False})


def pipeline_stages(config: Config, request: PipelineRequest, ctx: RunContext) -> list[Stage]:
    """The three stages of `mrcnn-cli run` with what each one's output depends on (`ctx.workers` train workers:
    the train key). Each stage runs with the context `run_dag` gives it; train's adds its storage and tags,
    evaluate's one inference actor. MissingInputError when a split's annotations file is not there. Building them
    runs nothing: each stage is one of the module's stage functions with this run's arguments bound."""

    splits = [(s, *split_paths(request.dataset, s)) for s in (request.train_split, request.val_split)]
    init = str(ModelSource.parse(request.init)) if request.init else None  # local paths made absolute: the stages
    # run where the cwd is not this
    annotations_hash = {name: _annotations_sha256(name, ann) for name, ann, _ in splits}

    # the shard schema too: shards cached by an older version would be refused by every reader
    data_inputs = {"dataset": request.dataset, "splits": [s[0] for s in splits], "annotations": annotations_hash,
                   "shard_schema": SCHEMA_VERSION}
    fields_of = stage_config_fields(config)
    return [
        Stage("preprocess", {**data_inputs, **fields_of["preprocess"]},
              partial(preprocess_stage, config, request.dataset, splits, annotations_hash)),
        Stage("train", {**fields_of["train"], "workers": ctx.workers, **_init_inputs(init)},
              partial(train_stage, config, request, init), headline=train_headline),
        Stage("evaluate", {**fields_of["evaluate"], "limit": request.eval_limit},
              partial(evaluate_stage, config, request), headline=evaluate_headline),
    ]


def train_request(request: PipelineRequest, upstream: dict[str, Any], *, init: str | None) -> TrainRequest:
    """The train stage's request: the preprocess stage's shards, the pipeline's splits, workers' CPUs and placement,
    `init` (the pipeline's --init made absolute) as the starting weights; its MLflow run is named "train"."""
    return TrainRequest(
        shards=upstream["preprocess"]["shards"], split=request.train_split, val_split=request.val_split,
        run_name="train", cpus_per_worker=request.cpus_per_worker, placement_strategy=request.placement_strategy,
        model_path=init,
    )


def evaluate_request(config: Config, request: PipelineRequest, upstream: dict[str, Any], *, out: str
                     ) -> EvaluateRequest:
    """The evaluate stage's request: the train stage's last checkpoint on the preprocess stage's shards of the val
    split, at most `eval_limit` images, the pipeline config's detection and evaluate settings; run named "evaluate"."""
    return EvaluateRequest(
        shards=upstream["preprocess"]["shards"], model_path=upstream["train"]["checkpoint"], split=request.val_split,
        out=out, run_name="evaluate", limit=request.eval_limit, detection=config.detection, settings=config.evaluate,
    )


def preprocess_stage(config: Config, dataset: str, splits: list[tuple[str, str, str]], annotations_hash: dict[str, str],
                     out_dir: str, upstream: dict, stage_ctx: RunContext) -> dict:
    """The preprocess stage: the splits' shards into `out_dir`, its MLflow run with the annotations' sha256.
    splits: (name, annotations file, image folder) each."""
    manifest = preprocess(config, splits=splits, out=out_dir, overwrite=True, ctx=stage_ctx)
    uri = stage_ctx.mlflow_uri()
    run_id = stage_ctx.create_run("preprocess", {"stage": "preprocess", "shards": out_dir, "dataset": dataset})
    tracking.log_params(uri, run_id, {"fingerprint": config.fingerprint(), "dataset": dataset,
                                      **{f"annotations_sha256.{k}": v for k, v in annotations_hash.items()}})
    tracking.log_artifact(uri, run_id, manifest)  # a path or a URI: log_artifact copies a URI locally first
    tracking.finish_run(uri, run_id)
    return {"shards": out_dir, "manifest": manifest, "run_id": run_id}


def train_stage(config: Config, request: PipelineRequest, init: str | None, out_dir: str, upstream: dict,
                stage_ctx: RunContext) -> dict:
    """The train stage: `train_request`'s run with its Ray storage in `out_dir`, tagged with preprocess's run."""
    result = train(
        config,
        train_request(request, upstream, init=init),
        replace(stage_ctx, storage=out_dir,
                tags={**stage_ctx.tags, "preprocess_run_id": upstream["preprocess"]["run_id"]}),
    )
    uri = stage_ctx.mlflow_uri()
    return {"checkpoint": result.checkpoint, "best_checkpoint": result.best_checkpoint, "run_id": result.run_id,
            "model_uri": f"runs:/{result.run_id}/model",
            "images_per_s": training_rate(tracking.metric_history(uri, result.run_id, "images_per_s"))}


def evaluate_stage(config: Config, request: PipelineRequest, out_dir: str, upstream: dict, stage_ctx: RunContext
                   ) -> dict:
    """The evaluate stage: `evaluate_request`'s evaluation with one inference actor, its files in `out_dir`."""
    with _local_dir(out_dir) as local_out:
        result = evaluate(evaluate_request(config, request, upstream, out=local_out), replace(stage_ctx, workers=1))
    return {"metrics": result.metrics, "out": out_dir, "run_id": result.run_id, "table": result.table}


HEADLINE_METRICS = ("segm/AP", "segm/AP50", "bbox/AP", "bbox/AP50")  # evaluate's, as the parent run shows them


def evaluate_headline(outputs: dict[str, Any]) -> dict[str, float]:
    """The evaluate stage's numbers on the parent run: `segm_AP`, `segm_AP50`, `bbox_AP`, `bbox_AP50` (the names
    of the evaluate run's metrics)."""
    metrics = outputs.get("metrics") or {}
    return {key.replace("/", "_"): float(metrics[key]) for key in HEADLINE_METRICS if key in metrics}


def train_headline(outputs: dict[str, Any]) -> dict[str, float]:
    """The train stage's number on the parent run: `train_images_per_s` (absent from markers older than it)."""
    rate = outputs.get("images_per_s")
    return {} if rate is None else {"train_images_per_s": float(rate)}


def training_rate(history: list[float]) -> float | None:
    """Images/s of a training run from its logged `images_per_s` values: their mean, without the first when there
    are more (it holds the first step's start-up: data pipeline, allocations)."""
    values = history[1:] if len(history) > 1 else history
    return sum(values) / len(values) if values else None


def pipeline_params(config: Config, request: PipelineRequest, ctx: RunContext) -> dict[str, Any]:
    """The settings a pipeline run is compared by, as the parent run's params: every config field
    (`section.field`), the request's fields and the context's compared ones (`pipeline.workers`, ...)."""
    own = {**{f.name: getattr(request, f.name) for f in fields(request) if f.metadata.get("compared", True)},
           **ctx.compared()}
    return {**config.flat(), **{f"pipeline.{k}": v for k, v in own.items()}}


EVALUATE_SECTIONS = ("detection", "evaluate")  # read by evaluation from the pipeline's config, not the model's


def stage_config_fields(config: Config) -> dict[str, dict[str, Any]]:
    """Every config field, as {"section.field": value}, under the first stage whose output it can change (later
    stages rerun with it through the chained keys). Derived, not listed: preprocess gets the shard fields
    (`Config.shard_fields`, what the fingerprint covers) and the `preprocess` section; evaluate gets
    EVALUATE_SECTIONS, which `evaluate_stage` passes on; train gets every other field, so a new setting reruns
    training unless it is placed elsewhere on purpose."""
    flat = config.flat()
    preprocess_keys = set(config.shard_fields()) | {k for k in flat if k.startswith("preprocess.")}
    evaluate_keys = {k for k in flat if k.split(".", 1)[0] in EVALUATE_SECTIONS}
    groups: dict[str, dict[str, Any]] = {"preprocess": {}, "train": {}, "evaluate": {}}
    for key, value in flat.items():
        stage = "preprocess" if key in preprocess_keys else "evaluate" if key in evaluate_keys else "train"
        groups[stage][key] = value
    return groups


def run_pipeline(config: Config, request: PipelineRequest, ctx: RunContext) -> DagResult:
    """`mrcnn-cli run`: the stages of `pipeline_stages` through `run_dag`, on `ctx`'s cluster. The dataset's
    annotations are read (their hashes key the stages) before Ray starts."""
    ctx = replace(ctx, tracking_uri=ctx.mlflow_uri())  # resolved on the driver, where the cwd is the user's
    stages = pipeline_stages(config, request, ctx)
    ctx.start_ray()
    if not is_uri(request.work_dir) and cluster_nodes() > 1:
        log.warning("work dir %s is a local path on a multi-node cluster; the stages run on any node, so it must be "
                    "a shared filesystem (else use s3:// or gs://)", request.work_dir)
    result = run_dag(stages, request.work_dir, ctx, force=request.force, run_name=f"pipeline-{config.name}",
                     params=pipeline_params(config, request, ctx))
    if request.register:
        tags = evaluate_headline(result.outputs["evaluate"])  # segm_AP, segm_AP50, bbox_AP, bbox_AP50
        tracking.register_model(ctx.mlflow_uri(), result.outputs["train"]["run_id"], request.register, tags=tags)
    return result


@contextmanager
def _local_dir(out_dir: str) -> Iterator[str]:
    """`out_dir` itself when local, else a temporary local folder copied to the URI afterwards (for stages whose
    report files are written with local file APIs)."""
    if not is_uri(out_dir):
        yield out_dir
        return
    filesystem, inner = filesystem_for(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        pafs.copy_files(tmp, inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)


def _init_inputs(init: str | None) -> dict[str, str]:
    """What the train stage's output depends on in `--init`: nothing without it (the keys stay as they were), else the
    location and, for a torchvision file, its sha256 (a file replaced in place retrains)."""
    if not init:
        return {}
    inputs = {"init": init}
    source = ModelSource.parse(init)
    if source.kind == "torchvision":
        inputs["init_sha256"] = _file_sha256(source.location)
    return inputs


def _file_sha256(path: str) -> str:
    return hashlib.sha256(read_bytes(path)).hexdigest()


def _annotations_sha256(split: str, annotations: str) -> str:
    try:
        return _file_sha256(annotations)
    except FileNotFoundError as exc:
        raise MissingInputError(f"{annotations}: no annotations file for split {split!r}; --dataset DIR needs "
                                f"DIR/annotations/instances_<split>.json and DIR/<split>/ for its splits") from exc

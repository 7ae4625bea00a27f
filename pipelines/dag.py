"""`mrcnn-cli run`: preprocess -> train -> evaluate as a DAG of Ray tasks, cached by fingerprint.

Each stage's output location is keyed by the fingerprint of its inputs and config (`<work>/<stage>-<key>`),
and a completion marker (`_COMPLETE.json`, holding the stage's outputs) is written last. A rerun with
nothing changed skips every stage and says so; a changed training setting changes the train and evaluate
keys only; a failed stage leaves no marker, stops the stages after it, and the next run resumes at it.
Not Ray Workflows (deprecated): plain Ray tasks with `num_cpus=0`, since a stage only launches Ray Data or
Ray Train work and must not hold the CPU its own workers wait for (DESIGN.md, "Ray").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrcnn.config import Config
from pipelines import tracking

MARKER = "_COMPLETE.json"


@dataclass
class Stage:
    """One node: `fn(out_dir, upstream_outputs, parent_run_id) -> outputs dict` (JSON-serialisable)."""

    name: str
    key_inputs: dict[str, Any]  # everything that decides this stage's output, besides its upstream keys
    fn: Callable[[str, dict[str, Any], str | None], dict[str, Any]]
    key: str = ""


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


def completed_outputs(out_dir: Path) -> dict[str, Any] | None:
    marker = out_dir / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())["outputs"]


def run_dag(
    stages: list[Stage],
    work_dir: str | Path,
    *,
    force: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    run_name: str = "pipeline",
    log: Callable[[str], None] = print,
) -> DagResult:
    """Run `stages` in order as Ray tasks, skipping those whose marker exists (unless at or after `force`)."""
    import ray

    names = [s.name for s in stages]
    if force is not None and force not in names:
        raise ValueError(f"--force {force!r}: choose one of {', '.join(names)}")
    stage_keys(stages)
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    parent = tracking.create_run(
        uri,
        experiment=experiment,
        run_name=run_name,
        tags={"stage": "pipeline", **{f"key.{s.name}": s.key for s in stages}},
    )
    result = DagResult(parent_run_id=parent)
    forcing = False
    upstream: dict[str, Any] = {}
    try:
        for stage in stages:
            forcing = forcing or stage.name == force
            out_dir = work / f"{stage.name}-{stage.key}"
            done = None if forcing else completed_outputs(out_dir)
            if done is not None:
                log(f"[run] {stage.name}: up to date ({out_dir}), skipped")
                result.skipped.append(stage.name)
            else:
                log(f"[run] {stage.name}: running -> {out_dir}")
                if out_dir.exists():
                    shutil.rmtree(out_dir)  # a failed or forced earlier attempt: start clean
                out_dir.mkdir(parents=True)
                task = ray.remote(num_cpus=0, max_retries=0)(_run_stage)
                done = ray.get(task.remote(stage.fn, str(out_dir), dict(upstream), parent))
                _write_marker(out_dir, stage, done)
                result.ran.append(stage.name)
            upstream[stage.name] = done
            result.outputs[stage.name] = done
            tracking.log_params(uri, parent, {f"{stage.name}.key": stage.key, f"{stage.name}.out": str(out_dir)})
    except Exception:
        tracking.finish_run(uri, parent, failed=True)
        raise
    tracking.finish_run(uri, parent)
    return result


def _run_stage(fn, out_dir: str, upstream: dict[str, Any], parent_run_id: str | None) -> dict[str, Any]:
    return fn(out_dir, upstream, parent_run_id)


def _write_marker(out_dir: Path, stage: Stage, outputs: dict[str, Any]) -> None:
    tmp = out_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"stage": stage.name, "key": stage.key, "outputs": outputs}, indent=1, default=str))
    os.replace(tmp, out_dir / MARKER)  # written last: its presence means the stage is complete


# ------------------------------------------------------------------------------------------ the pipeline
@dataclass(frozen=True)
class PipelineRequest:
    dataset: str
    train_split: str = "train2017"
    val_split: str = "val2017"
    workers: int = 1
    use_gpu: bool | None = None
    work_dir: str = "pipeline_out"
    force: str | None = None
    address: str | None = None
    tracking_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    cpus_per_worker: float = 1.0
    eval_limit: int | None = None


def pipeline_stages(config: Config, request: PipelineRequest) -> list[Stage]:
    """The three stages of `mrcnn-cli run` with what each one's output depends on."""
    from pipelines.coco_source import split_paths

    splits = [(s, *split_paths(request.dataset, s)) for s in (request.train_split, request.val_split)]
    annotations_hash = {name: _file_sha256(ann) for name, ann, _ in splits}
    uri = tracking.resolve_tracking_uri(request.tracking_uri)
    cfg = config.to_dict()

    def preprocess_stage(out_dir: str, upstream: dict, parent: str | None) -> dict:
        from pipelines.preprocess import preprocess

        manifest = preprocess(config, splits=splits, out=out_dir, overwrite=True)
        run_id = tracking.create_run(
            uri, experiment=request.experiment, run_name="preprocess", parent_run_id=parent,
            tags={"stage": "preprocess", "shards": out_dir, "dataset": request.dataset},
        )
        tracking.log_params(uri, run_id, {"fingerprint": config.fingerprint(), "dataset": request.dataset,
                                          **{f"annotations_sha256.{k}": v for k, v in annotations_hash.items()}})
        tracking.log_artifact(uri, run_id, manifest)
        tracking.finish_run(uri, run_id)
        return {"shards": out_dir, "manifest": manifest, "run_id": run_id}

    def train_stage(out_dir: str, upstream: dict, parent: str | None) -> dict:
        from pipelines.train import TrainRequest, train

        result = train(
            config,
            TrainRequest(
                shards=upstream["preprocess"]["shards"], split=request.train_split, val_split=request.val_split,
                workers=request.workers, use_gpu=request.use_gpu, storage=out_dir, run_name="train",
                tracking_uri=uri, experiment=request.experiment, parent_run_id=parent,
                cpus_per_worker=request.cpus_per_worker,
                extra_tags={"preprocess_run_id": upstream["preprocess"]["run_id"]},
            ),
        )
        return {"checkpoint": result.checkpoint, "best_checkpoint": result.best_checkpoint, "run_id": result.run_id,
                "model_uri": f"runs:/{result.run_id}/model"}

    def evaluate_stage(out_dir: str, upstream: dict, parent: str | None) -> dict:
        from pipelines.evaluate import EvaluateRequest, evaluate

        result = evaluate(
            EvaluateRequest(
                shards=upstream["preprocess"]["shards"], model_path=upstream["train"]["checkpoint"],
                split=request.val_split, workers=1, use_gpu=request.use_gpu, out=out_dir, tracking_uri=uri,
                experiment=request.experiment, parent_run_id=parent, run_name="evaluate", limit=request.eval_limit,
            )
        )
        return {"metrics": result.metrics, "out": out_dir, "run_id": result.run_id, "table": result.table}

    data_inputs = {"dataset": request.dataset, "splits": [s[0] for s in splits], "annotations": annotations_hash}
    return [
        Stage("preprocess", {**data_inputs, "fingerprint": config.fingerprint()}, preprocess_stage),
        Stage("train", {k: cfg[k] for k in ("backbone", "rpn", "roi", "mask", "train")} | {
            "workers": request.workers}, train_stage),
        Stage("evaluate", {"detection": cfg["detection"], "evaluate": cfg["evaluate"], "limit": request.eval_limit},
              evaluate_stage),
    ]


def run_pipeline(config: Config, request: PipelineRequest) -> DagResult:
    from pipelines.ray_env import init_ray

    init_ray(request.address)
    return run_dag(
        pipeline_stages(config, request),
        request.work_dir,
        force=request.force,
        tracking_uri=request.tracking_uri,
        experiment=request.experiment,
        run_name=f"pipeline-{config.name}",
    )


def _file_sha256(path: str) -> str:
    from pipelines.coco_source import read_bytes

    return hashlib.sha256(read_bytes(path)).hexdigest()

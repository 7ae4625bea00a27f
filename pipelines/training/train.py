"""`mrcnn-cli train`: Ray Train data-parallel training from the Parquet shards.

The driver side only: it checks the shards against the config, plans the run (steps, lr scaling), creates
the MLflow run, builds the Ray Data datasets and the `TorchTrainer`, and after `fit()` logs the final model.
The per-worker loop is `pipelines.training.loop`.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import mrcnn
import pipelines
from mrcnn.anchors import anchors_from_config
from mrcnn.config import Config, ConfigError, check_flip, fingerprint_diff
from mrcnn.export import onnx_bytes
from mrcnn.model import build_model
from pipelines.data.categories import CategoryMap
from pipelines.data.errors import InputError
from pipelines.data.loader import batches_dataset
from pipelines.data.shardset import ShardSet
from pipelines.infra import tracking
from pipelines.infra.context import RunContext
from pipelines.infra.logs import get_logger
from pipelines.infra.ray_env import cluster_nodes
from pipelines.infra.storage import absolute, write_bytes
from pipelines.training.checkpoints import find_latest_checkpoint, load_checkpoint, load_model_state, uri_for
from pipelines.training.hooks.ap_eval import ApSubset, subset_of_split
from pipelines.training.loop import train_loop_per_worker
from pipelines.training.model_source import ModelSource, check_init
from pipelines.training.plan import WorkerPlan, total_steps_for

log = get_logger("train")


@dataclass(frozen=True)
class TrainRequest:
    """What `mrcnn-cli train` was asked; None means "as the config says". Where it runs and reports (Ray,
    MLflow, workers, GPUs, checkpoint storage) is the run context's."""

    shards: str
    split: str = "train2017"
    val_split: str | None = "val2017"
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    layers: str | None = None
    model_path: str | None = None  # `--init`: our checkpoint, or torchvision:FILE
    backbone_weights: str | None = None
    resume: bool = False
    run_name: str | None = None
    cpus_per_worker: float | None = None  # None: `default_cpus_per_worker`
    placement_strategy: str = "PACK"  # of the workers' placement group; STRICT_SPREAD: one worker per node
    log_model: bool = True
    register: str | None = None  # register the final MLflow model under this name (alias `champion`)
    stop_at: int | None = None  # end this run after this step (schedule unchanged); continue with resume
    # an MLflow run made beforehand to log into (a sweep's trial run, reused when the trial restarts); None: a new one
    mlflow_run_id: str | None = None
    # False: that run holds the params already (a sweep's restarted trial; MLflow refuses a changed value, and
    # `code_version` changes with a commit between)
    log_params: bool = True


@dataclass
class TrainResult:
    checkpoint: str  # the latest checkpoint (the final weights)
    best_checkpoint: str | None  # lowest validation loss
    run_id: str
    run_name: str
    storage: str
    metrics: dict[str, Any]
    total_steps: int


def apply_request(config: Config, request: TrainRequest) -> Config:
    """Fold the command-line training settings into the config (one typed config everywhere after this)."""
    changes: dict[str, Any] = {}
    if request.steps is not None:
        changes["steps"] = request.steps
    if request.epochs is not None:
        changes["epochs"] = request.epochs
        changes.setdefault("steps", 0)  # --epochs means epochs
    if request.batch_size is not None:
        changes["batch_size"] = request.batch_size
    if request.layers is not None:
        changes["layers"] = request.layers
    return replace(config, train=replace(config.train, **changes)) if changes else config


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

# CPUs a GPU train worker reserves: one for the Python step loop, which launches the kernels (Mask R-CNN's
# many small ops make it launch-bound), and one for Ray Data's fetch thread, which collates, pins and copies each
# batch to the device. The rest of a node's CPUs stay free for the decode tasks that feed it: reserving more per
# worker would take them from the input pipeline (docs/design.md, "Ray").
GPU_WORKER_CPUS = 2.0


def default_cpus_per_worker(requested: float | None, *, use_gpu: bool) -> float:
    """`--cpus-per-worker`, or its default: GPU_WORKER_CPUS on GPUs, 1 on CPUs (a CPU worker's torch threads
    follow the CPUs it holds; on a small box the rest feed it)."""
    if requested is not None:
        if requested <= 0:
            raise InputError(f"--cpus-per-worker {requested}: must be above 0")
        return float(requested)
    return GPU_WORKER_CPUS if use_gpu else 1.0


def train(config: Config, request: TrainRequest, ctx: RunContext, *,
          after_step: Callable[[int, int], None] | None = None, callbacks: list[Any] | None = None) -> TrainResult:
    """Train `config` as `request` says, on `ctx`'s cluster (`ctx.workers` workers, checkpoints under
    `ctx.storage`, the MLflow run in `ctx.experiment` under `ctx.parent_run_id`); returns the checkpoints and the
    MLflow run.

    after_step: called by every worker after each step as `after_step(step, rank)` (`WorkerPlan.after_step`);
    for tests (fault drills), None otherwise. It is pickled to the workers.
    callbacks: Ray Train callbacks of the run (a sweep's trial: `TuneReportCallback`, rank 0's reports to Tune).
    """
    shards, config, init = _checked_inputs(config, request)
    manifest, splits = shards.manifest, shards.splits
    val_split = request.val_split if request.val_split in splits else None
    num_classes = CategoryMap.from_dict(shards.categories).num_classes

    ctx.start_ray()
    use_gpu = ctx.gpus()
    cpus_per_worker = default_cpus_per_worker(request.cpus_per_worker, use_gpu=use_gpu)
    if ctx.storage is None and cluster_nodes() > 1:
        raise InputError("--storage is required on a multi-node cluster: a path or URI every node can read")
    storage = ctx.storage or str(Path("checkpoints").resolve())

    global_batch = config.train.batch_size * ctx.workers
    total_steps, steps_per_epoch = total_steps_for(
        config, train_images=int(splits[request.split]["num_images"]), global_batch=global_batch
    )
    resume_from = _resume_checkpoint(storage, config, manifest["fingerprint"]) if request.resume else None
    run_name = request.run_name or f"train-{manifest['fingerprint'][:8]}-{time.strftime('%Y%m%d-%H%M%S')}"

    tracking_uri = ctx.mlflow_uri()
    run_id = request.mlflow_run_id or ctx.create_run(run_name, {"stage": "train", "shards": request.shards,
                                                                 "fingerprint": manifest["fingerprint"]})
    if request.log_params:  # else the run holds them already (TrainRequest.log_params)
        tracking.log_params(tracking_uri, run_id, _run_params(
            config, request, manifest, workers=ctx.workers, global_batch=global_batch, total_steps=total_steps,
            use_gpu=use_gpu, cpus_per_worker=cpus_per_worker))

    datasets, ap = _datasets(shards, request.split, val_split, config)
    plan = WorkerPlan(
        config=config,
        categories=shards.categories,
        fingerprint=manifest["fingerprint"],
        num_classes=num_classes,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        global_batch=global_batch,
        model_path=str(init) if init is not None else None,
        backbone_weights=absolute(request.backbone_weights) if request.backbone_weights else None,
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
        has_val=val_split is not None,
        ap_subset=ap,
        stop_at=request.stop_at,
        resume_from=resume_from,
        after_step=after_step,
    )
    trainer = _trainer(plan, datasets, workers=ctx.workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                       placement_strategy=request.placement_strategy, run_name=run_name, storage=storage,
                       callbacks=callbacks)
    result = _fit(trainer, tracking_uri, run_id)
    # Ray's Checkpoint.path is a path inside its storage filesystem (no scheme): made a URI again here, so
    # that the DAG's later stages, evaluate and predict read it from wherever they run
    latest = checkpoint_uri(result.checkpoint, storage)
    best = checkpoint_uri(lowest_val_loss(result.best_checkpoints), storage)
    if request.log_model:
        log_final_model(tracking_uri, run_id, latest, config=config, num_classes=num_classes)
        if request.register:
            tracking.register_model(tracking_uri, run_id, request.register)
    tracking.log_artifact(tracking_uri, run_id, latest, "checkpoint")
    tracking.finish_run(tracking_uri, run_id)
    return TrainResult(
        checkpoint=latest,
        best_checkpoint=best,
        run_id=run_id,
        run_name=run_name,
        storage=storage,
        metrics=dict(result.metrics or {}),
        total_steps=total_steps,
    )


def _checked_inputs(config: Config, request: TrainRequest) -> tuple[ShardSet, Config, ModelSource | None]:
    """The request's checks before any work (placement, flips against the anchors, the shards against the config,
    the split there, the starting weights against the model) -> (the shards, the config with the request's
    settings folded in, the starting weights' source or None)."""
    if request.placement_strategy not in PLACEMENT_STRATEGIES:
        raise InputError(f"placement strategy {request.placement_strategy!r}: one of {', '.join(PLACEMENT_STRATEGIES)}")
    check_flip(config)  # flips need centred anchors (the torchvision preset's are not: it sets train.flip=false)
    shards = ShardSet.open(request.shards)
    shards.check_fingerprint(config)  # before any work: shards made with another config are refused
    config = apply_request(config, request)
    shards.split(request.split)  # refused here when absent, naming the splits there are
    categories = CategoryMap.from_dict(shards.categories)
    init = ModelSource.parse(request.model_path) if request.model_path else None
    # a source that is not a model, or weights that do not fit, are refused here, not in each worker
    check_init(init, config=config, categories=categories, num_classes=categories.num_classes,
               backbone_weights=request.backbone_weights)
    return shards, config, init


def _run_params(config: Config, request: TrainRequest, manifest: dict[str, Any], *, workers: int, global_batch: int,
                total_steps: int, use_gpu: bool, cpus_per_worker: float) -> dict[str, Any]:
    """The MLflow run's params: every config setting (flat) and the run's data, cluster and plan."""
    return {
        **config.flat(),
        "dataset_fingerprint": manifest["fingerprint"],
        "annotations_sha256": manifest["splits"][request.split].get("annotations_sha256", ""),
        "shards": request.shards,
        "workers": workers,
        "placement_strategy": request.placement_strategy,
        "global_batch": global_batch,
        "total_steps": total_steps,
        "use_gpu": use_gpu,
        "cpus_per_worker": cpus_per_worker,
        "code_version": tracking.code_version(),
    }


def _resume_checkpoint(storage: str, config: Config, fingerprint: str) -> str:
    """`--resume`: the latest checkpoint under `storage` (a path or a URI that every worker reads) of this run, the
    same config and the same shards; InputError naming the first refusals when there is none."""
    refused: list[str] = []
    resume_from = find_latest_checkpoint(
        storage, accept=lambda meta: resume_refusal(meta, config, fingerprint), refused=refused)
    if resume_from is None:
        why = (": none of this config and these shards; " + "; ".join(refused[:3])
               + (f" (and {len(refused) - 3} more)" if len(refused) > 3 else "")) if refused else ""
        raise InputError(f"--resume: no checkpoint to resume under {storage}{why}")
    log.info("resuming from %s", resume_from)
    return resume_from


def _datasets(shards: ShardSet, split: str, val_split: str | None, config: Config
              ) -> tuple[dict[str, Any], ApSubset | None]:
    """The run's Ray datasets of batches ("train", "val" when there is a val split, "val_ap" when rank 0 computes
    AP on a subset of it), decoded into the object store under `train.cache_data` -> (datasets, the AP subset or
    None)."""
    num_anchors = _num_anchors(config)
    datasets = {"train": batches_dataset(shards, split, config, num_anchors)}
    if val_split:
        datasets["val"] = batches_dataset(shards, val_split, config, num_anchors)
    ap = subset_of_split(shards, val_split, count=config.train.val_ap_images) if val_split and \
        config.train.val_ap_images else None
    if ap is not None:  # rank 0 alone evaluates it: not split between the workers
        datasets["val_ap"] = batches_dataset(shards, val_split, config, num_anchors, image_ids=ap.image_ids)
    if config.train.cache_data:
        # the val split too, even when validated once: streaming it fresh at the end of training cost the demo
        # 18 s (train workers holding the CPUs), decoding it here 6 s
        log.info("decoding %s into the object store (train.cache_data)", ", ".join(datasets))
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    return datasets, ap


def _trainer(plan: WorkerPlan, datasets: dict[str, Any], *, workers: int, use_gpu: bool, cpus_per_worker: float,
             placement_strategy: str, run_name: str, storage: str, callbacks: list[Any] | None) -> Any:
    """The run's `TorchTrainer`: `workers` workers running `train_loop_per_worker(plan)`, checkpoints kept by
    validation loss under `storage`/`run_name`, the datasets split between the workers in order (but "val_ap")."""
    # Ray is imported when training starts: `mrcnn-cli --help` and the GPU tests import this module without it
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = plan.config
    return TorchTrainer(
        partial(train_loop_per_worker, plan),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.train.num_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # order preserved so that a resumed run sees the batches an uninterrupted one would
        dataset_config=DataConfig(datasets_to_split=[n for n in datasets if n != "val_ap"],
                                  execution_options=ExecutionOptions(preserve_order=True)),
    )


def _fit(trainer: Any, tracking_uri: str, run_id: str) -> Any:
    """`trainer.fit()`'s Result; the MLflow run is marked failed when the fit raises or its result holds an error."""
    try:
        result = trainer.fit()
    except Exception:
        tracking.finish_run(tracking_uri, run_id, failed=True)
        raise
    if getattr(result, "error", None) is not None:
        tracking.finish_run(tracking_uri, run_id, failed=True)
        raise result.error
    return result


def lowest_val_loss(checkpoints: list[tuple[Any, dict[str, Any]]]) -> Any:
    """The checkpoint of (checkpoint, metrics) pairs (Ray's `Result.best_checkpoints`) with the lowest `val_loss`;
    one without a finite `val_loss` (saved before the first validation, or a non-finite one) ranks last, and among
    equals the earliest wins."""

    def loss(pair: tuple[Any, dict[str, Any]]) -> float:
        value = pair[1].get("val_loss")
        return float(value) if value is not None and math.isfinite(value) else math.inf

    return min(checkpoints, key=loss)[0]


def resume_refusal(meta: dict[str, Any], config: Config, fingerprint: str) -> str | None:
    """Why a checkpoint (its meta.json) is not one `--resume` may continue with `config` on shards of
    `fingerprint`, or None when it is: another run's weights would be trained on as if they were this one's."""
    if meta.get("fingerprint") != fingerprint:
        return f"made from other shards (fingerprint {meta.get('fingerprint')!r}, these are {fingerprint!r})"
    if not meta.get("config"):
        return "its meta.json holds no config"
    try:  # through the typed config: settings added since the checkpoint was written read as their defaults
        theirs = Config.from_dict(meta["config"]).flat()
    except ConfigError as exc:
        return f"its config does not load: {exc}"
    diff = fingerprint_diff(theirs, config.flat())
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        return "trained with another config: " + "; ".join(diff[:3]) + more
    return None


def checkpoint_uri(checkpoint: Any, storage: str) -> str:
    """Where a Ray Train checkpoint (anything with `.path`, the path inside `storage`'s filesystem) lives, written
    as `storage` is: a local path for a local storage, `scheme://...` for a URI storage (`s3://b/ckpt` ->
    `s3://b/ckpt/run/checkpoint_000003`, `file:///shared/ckpt` -> `file:///shared/ckpt/run/checkpoint_000003`)."""
    return uri_for(storage, checkpoint.path)


def log_final_model(tracking_uri: str, run_id: str, checkpoint_dir: str, *, config: Config, num_classes: int) -> None:
    """The final weights as an MLflow PyTorch model, loadable with `mlflow.pytorch.load_model`; the model
    carries its config and category map (`model.mrcnn_meta`) so it predicts without the shards."""
    from importlib.metadata import version

    import mlflow
    import mlflow.pytorch

    state = load_checkpoint(checkpoint_dir)
    model = build_model(config, num_classes=num_classes)
    load_model_state(model, state.model)
    model.eval()
    model.mrcnn_meta = {"config": config.to_dict(), "categories": state.meta["categories"], "num_classes": num_classes}
    with tracking.fluent_store(tracking_uri), mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as tmp:
        extra_files = []
        if config.train.export_onnx:  # `mrcnn-cli export`'s file, carrying the same meta
            extra_files.append(str(Path(tmp) / "model.onnx"))
            meta = {**model.mrcnn_meta, "source": f"runs:/{run_id}/model"}
            write_bytes(extra_files[0], onnx_bytes(model, image_size=config.image.max_dim, batch=1, meta=meta))
        mlflow.pytorch.log_model(
            model,
            name="model",
            # pickle: the model's forward takes a Batch dict, which the traced "pt2" format cannot express
            serialization_format="pickle",
            code_paths=[str(Path(mrcnn.__file__).parent), str(Path(pipelines.__file__).parent)],
            # given, not inferred: inference imports the model in a subprocess, slow and pointless here
            # torch and torchvision as this process runs them, without a local tag (`2.11.0+cu130` -> 2.11.0)
            pip_requirements=[f"{name}=={version(name).split('+')[0]}" for name in ("torch", "torchvision")]
            + ["pycocotools>=2.0.11", "numpy>=2.4", "pyyaml>=6"],
            extra_files=extra_files or None,
        )


def _num_anchors(config: Config) -> int:
    return int(anchors_from_config(config).shape[0])

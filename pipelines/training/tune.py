"""`mrcnn-cli tune`: a hyperparameter sweep on Ray Tune, each trial our own training, each an MLflow run.

Ray Train V2's way (the installed Ray's "Hyperparameter Tuning with Ray Tune" guide and
`ray.tune.integration.ray_train.TuneReportCallback`): a Tune *function trainable* (`run_trial`) builds the trial's
config from the values Tune sampled and calls `pipelines.training.train.train`, which builds and fits the
`TorchTrainer`; the trainer's `TuneReportCallback` passes rank 0's reports (every checkpoint: each epoch's end
with its validation loss) to Tune. The trial's function holds a token CPU (its workers hold the rest), so the
trials that run at once are as many as the cluster's GPUs (or CPUs) hold `--workers-per-trial` workers, or
`--max-concurrent`.

MLflow: the sweep's parent run holds the search space and the scheduler as params and, at the end, the best
trial's values and metric; each trial's run nests under it (found again by its `tune.trial_id` tag when a trial
restarts, never duplicated), holds the config (the sampled values among it) and the per-epoch metrics, and is
tagged where it stopped (`tune.stopped_at_epoch`, `tune.stopped_early`). ASHA's stopped trials are ended KILLED.

Resume (`--resume`, same `--name` and `--storage`): `Tuner.restore` continues the sweep; finished trials are not
run again, the parent run is the one `sweep.json` in the sweep's folder names.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from mrcnn.config import Config
from pipelines.data.errors import InputError
from pipelines.data.shardset import ShardSet
from pipelines.infra import tracking
from pipelines.infra.context import RunContext
from pipelines.infra.logs import get_logger
from pipelines.infra.storage import read_bytes, write_atomic
from pipelines.training.checkpoints import uri_for
from pipelines.training.plan import total_steps_for
from pipelines.training.search_space import SearchSpec, parse_searches, trial_config
from pipelines.training.train import TrainRequest, default_cpus_per_worker, train

log = get_logger("tune")

SCHEDULERS = ("asha", "fifo")
# the metric ASHA compares and the best trial is chosen by, with its direction: the validation loss, or the segm AP
# of the quick COCO evaluation (`train.val_ap_images`, hooks/ap_eval.py)
METRICS = {"val_loss": "min", "segm_AP": "max"}
AP_IMAGES = 100  # `train.val_ap_images` of a segm_AP sweep whose config says 0
TRIAL_TAG = "tune.trial_id"
# the CPU a trial's function holds: a token (Tune refuses a trial with no resources); it only waits on its trainer,
# whose workers hold the CPUs and GPUs
TRIAL_DRIVER_CPUS = 0.01


@dataclass(frozen=True)
class TuneRequest:
    """What `mrcnn-cli tune` was asked. The workers of each trial are the run context's `workers`."""

    shards: str
    searches: tuple[str, ...]
    samples: int = 1  # Tune's num_samples: draws of the space (each grid value that many times)
    scheduler: str = "asha"
    metric: str = "val_loss"
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2  # ASHA keeps the best 1/reduction_factor at each rung
    max_concurrent: int | None = None
    name: str | None = None  # of the sweep: its folder under the storage, its MLflow parent run
    resume: bool = False
    split: str = "train2017"
    val_split: str = "val2017"
    cpus_per_worker: float | None = None


@dataclass
class TuneResult:
    rows: list[dict[str, Any]]  # one per trial: its values, metric, where it stopped, checkpoint, MLflow run
    best: dict[str, Any]  # the best trial's row
    parent_run_id: str
    name: str  # of the sweep
    path: str  # the sweep's folder (what --resume continues)


@dataclass(frozen=True)
class TrialPlan:
    """What every trial receives (pickled to Tune's trial actors)."""

    config: Config  # the base config; the trial's values are applied over it
    train_request: TrainRequest
    ctx: RunContext  # GPU use resolved, parent run the sweep's, storage the trials' folder
    sweep: str
    after_step: Callable[[int, int], None] | None = None  # `train()`'s per-step callback (tests' fault drills)


def check_request(request: TuneRequest, config: Config) -> dict[str, SearchSpec]:
    """Every setting of the sweep checked before Ray starts: the search specs against the config
    (`search_space.parse_searches`), the scheduler, metric and counts; returns the specs."""
    specs = parse_searches(request.searches, config)
    if request.scheduler not in SCHEDULERS:
        raise InputError(f"--scheduler {request.scheduler!r}: one of {', '.join(SCHEDULERS)}")
    if request.metric not in METRICS:
        raise InputError(f"--metric {request.metric!r}: one of {', '.join(METRICS)}")
    for option, value in (("--samples", request.samples), ("--grace-period", request.grace_period),
                          ("--max-concurrent", 1 if request.max_concurrent is None else request.max_concurrent)):
        if value < 1:
            raise InputError(f"{option} {value}: must be at least 1")
    if request.reduction_factor < 2:
        raise InputError(f"reduction factor {request.reduction_factor}: must be at least 2")
    if request.resume and not request.name:
        raise InputError("--resume: give the --name of the sweep to continue")
    return specs


def sweep_config(config: Config, metric: str = "val_loss") -> Config:
    """The base config of the trials: a validation after every epoch (`train.val_every` 0 -> 1), where ASHA
    compares the metric at each rung; for segm_AP the quick COCO evaluation too (`train.val_ap_images` 0 ->
    AP_IMAGES)."""
    changes = {}
    if config.train.val_every == 0:
        log.info("train.val_every 0 -> 1: a sweep compares the trials' %s after every epoch", metric)
        changes["val_every"] = 1
    if metric == "segm_AP" and config.train.val_ap_images == 0:
        log.info("train.val_ap_images 0 -> %d: segm_AP of the first %d validation images by id", AP_IMAGES, AP_IMAGES)
        changes["val_ap_images"] = AP_IMAGES
    return replace(config, train=replace(config.train, **changes)) if changes else config


def tune(config: Config, request: TuneRequest, ctx: RunContext, *,
         after_step: Callable[[int, int], None] | None = None) -> TuneResult:
    """Run the sweep `request` describes over `config` on `ctx`'s cluster (`ctx.workers` workers a trial); returns
    one row per trial and the best one. after_step: given to every trial's `train()` (tests: fault drills)."""
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    specs = check_request(request, config)
    config = sweep_config(config, request.metric)
    shards = ShardSet.open(request.shards)
    shards.check_fingerprint(config)
    if request.val_split not in shards.splits:
        raise InputError(f"--val-split {request.val_split!r}: not in the shards ({', '.join(shards.splits)}); a sweep "
                         "compares validation losses")
    shards.split(request.split)
    name = request.name or f"tune-{shards.manifest['fingerprint'][:8]}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = ctx.storage or str(Path("tune_results").resolve())
    path = f"{storage.rstrip('/')}/{name}"

    ctx.start_ray()
    ctx = replace(ctx, use_gpu=ctx.gpus(), tracking_uri=ctx.mlflow_uri())
    cpus_per_worker = default_cpus_per_worker(request.cpus_per_worker, use_gpu=ctx.use_gpu)
    concurrent = max_concurrent(ctx.workers, cpus_per_worker, use_gpu=ctx.use_gpu, limit=request.max_concurrent)
    train_images = int(shards.splits[request.split]["num_images"])
    total, per_epoch = total_steps_for(config, train_images=train_images,
                                       global_batch=config.train.batch_size * ctx.workers)
    max_epochs = math.ceil(total / per_epoch)

    from ray.tune import Tuner

    resumed = request.resume and Tuner.can_restore(path)
    if request.resume and not resumed:
        raise InputError(f"--resume: no sweep to continue at {path}")
    parent = read_sweep_record(path)["parent_run_id"] if resumed else start_parent_run(
        ctx, name, specs, request, concurrent=concurrent, max_epochs=max_epochs)
    if not resumed:
        write_sweep_record(path, {"parent_run_id": parent, "searches": list(request.searches)})
    plan = TrialPlan(
        config=config,
        train_request=TrainRequest(shards=request.shards, split=request.split, val_split=request.val_split,
                                   cpus_per_worker=cpus_per_worker, log_model=False),
        ctx=replace(ctx, parent_run_id=parent, storage=f"{path}/trials"),
        sweep=name,
        after_step=after_step,
    )
    trainable = ray_tune.with_resources(partial(run_trial, plan=plan), {"cpu": TRIAL_DRIVER_CPUS})
    if resumed:
        log.info("continuing sweep %s from %s", name, path)
        tuner = Tuner.restore(path, trainable=trainable, resume_unfinished=True, restart_errored=True)
    else:
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=request.grace_period,
                                   reduction_factor=request.reduction_factor)
                     if request.scheduler == "asha" else FIFOScheduler())
        tuner = Tuner(
            trainable,
            param_space={key: spec.to_tune() for key, spec in specs.items()},
            tune_config=ray_tune.TuneConfig(metric=request.metric, mode=METRICS[request.metric],
                                            scheduler=scheduler, num_samples=request.samples,
                                            max_concurrent_trials=concurrent),
            run_config=ray_tune.RunConfig(name=name, storage_path=storage),
        )
    log.info("sweep %s: up to %d trials at once, %d worker(s) each; MLflow parent run %s", name, concurrent,
             ctx.workers, parent)
    try:
        grid = tuner.fit()
    except Exception:
        tracking.finish_run(ctx.tracking_uri, parent, failed=True)
        raise
    rows = trial_rows(grid, plan, specs, train_images=train_images, metric=request.metric)
    best = finish_sweep(ctx, parent, rows, specs, metric=request.metric)
    return TuneResult(rows=rows, best=best, parent_run_id=parent, name=name, path=path)


def max_concurrent(workers: int, cpus_per_worker: float, *, use_gpu: bool, limit: int | None) -> int:
    """Trials at once: as many as the cluster's GPUs (one per worker) or CPUs hold `workers` workers, at most
    `limit`, at least one."""
    import ray

    total = ray.cluster_resources()
    fits = int(total.get("GPU", 0) // workers) if use_gpu else int(total.get("CPU", 0) // (workers * cpus_per_worker))
    return max(1, min(fits, limit or fits))


def start_parent_run(ctx: RunContext, name: str, specs: dict[str, SearchSpec], request: TuneRequest, *,
                     concurrent: int, max_epochs: int) -> str:
    """The sweep's MLflow run (the search space and the scheduler as params) and the runs table's view of it: the
    searched settings and the metric as columns, the sweep's trials as rows, best first."""
    parent = ctx.create_run(name, {"stage": "tune", "shards": request.shards})
    tracking.log_params(ctx.tracking_uri, parent, {
        **{f"search.{key}": str(spec).partition("=")[2] for key, spec in specs.items()},
        "scheduler": request.scheduler, "metric": request.metric, "samples": request.samples,
        "grace_period": request.grace_period, "reduction_factor": request.reduction_factor,
        "max_epochs": max_epochs, "max_concurrent": concurrent, "workers_per_trial": ctx.workers,
    })
    tracking.set_runs_view(ctx.tracking_uri, ctx.experiment, view_key(name), params=list(specs),
                           metrics=[request.metric], search_filter=f"tags.`mlflow.parentRunId` = '{parent}'",
                           order_by=f"metrics.`{request.metric}`", ascending=METRICS[request.metric] == "min")
    return parent


def view_key(name: str) -> str:
    """The shared view of the runs table that shows sweep `name`'s columns."""
    return "tune-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def run_trial(sampled: dict[str, Any], *, plan: TrialPlan) -> None:
    """Tune's function trainable: one trial, our training with the sampled values, its metrics to Tune through
    `TuneReportCallback`. A restarted trial (a resumed sweep) logs into the MLflow run it made the first time."""
    from ray import tune as ray_tune
    from ray.tune.integration.ray_train import TuneReportCallback

    context = ray_tune.get_context()
    trial_id = context.get_trial_id()
    config = trial_config(plan.config, sampled)
    run_id, restarted = trial_run(plan.ctx, plan.sweep, trial_id, context.get_trial_name(), sampled)
    request = replace(plan.train_request, run_name=trial_id, mlflow_run_id=run_id, log_params=not restarted)
    # the trainer's own failure handling (`train.max_failures`) restores a trial whose worker died from its checkpoint
    train(config, request, plan.ctx, callbacks=[TuneReportCallback()], after_step=plan.after_step)


def trial_run(ctx: RunContext, sweep: str, trial_id: str, trial_name: str, sampled: dict[str, Any]
              ) -> tuple[str, bool]:
    """The trial's MLflow run, nested under the sweep's (`ctx.parent_run_id`), and whether the trial made it
    before (found by its `tune.trial_id` tag: a restarted trial, whose params are logged already) or it is new
    (its sampled values logged as params `sampled.<key>`)."""
    runs = tracking.find_runs(ctx.mlflow_uri(), ctx.experiment,
                              {"mlflow.parentRunId": ctx.parent_run_id, TRIAL_TAG: trial_id})
    if runs:
        return runs[0], True
    run_id = ctx.create_run(trial_name, {"stage": "tune-trial", TRIAL_TAG: trial_id, "tune.sweep": sweep})
    tracking.log_params(ctx.mlflow_uri(), run_id, {f"sampled.{k}": v for k, v in sampled.items()})
    return run_id, False


def trial_rows(grid: Any, plan: TrialPlan, specs: dict[str, SearchSpec], *, train_images: int,
               metric: str) -> list[dict[str, Any]]:
    """One row per trial: trial id, sampled values, last metric, the epochs and steps it trained, whether it
    stopped before the end of its schedule, its latest checkpoint and its MLflow run."""
    ctx = plan.ctx
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or str(result.path).rstrip("/").rpartition("/")[2]
        sampled = {k: result.config.get(k) for k in specs}
        config = trial_config(plan.config, sampled)
        total, per_epoch = total_steps_for(config, train_images=train_images,
                                           global_batch=config.train.batch_size * ctx.workers)
        runs = tracking.find_runs(ctx.tracking_uri, ctx.experiment,
                                  {"mlflow.parentRunId": ctx.parent_run_id, TRIAL_TAG: trial_id})
        step = int(m.get("step", 0))
        rows.append({
            # epochs trained, from the steps: the report at the last step says the epoch it is in
            "trial": trial_id, **sampled, metric: m.get(metric), "epoch": math.ceil(step / per_epoch), "step": step,
            "stopped_early": step < total, "error": str(result.error) if result.error else None,
            "checkpoint": uri_for(ctx.storage, m["checkpoint_path"]) if m.get("checkpoint_path") else None,
            "run_id": runs[0] if runs else None,
        })
    return rows


def finish_sweep(ctx: RunContext, parent: str, rows: list[dict[str, Any]], specs: dict[str, SearchSpec], *,
                 metric: str) -> dict[str, Any]:
    """Tag and end every trial's run (KILLED where the scheduler stopped it) and put the best trial's values and
    metric on the parent run; returns the best row."""
    uri = ctx.tracking_uri
    for row in rows:
        if row["run_id"] is None:
            continue
        tracking.set_tag(uri, row["run_id"], "tune.stopped_at_epoch", str(row["epoch"]))
        tracking.set_tag(uri, row["run_id"], "tune.stopped_early", str(row["stopped_early"]).lower())
        if row["error"]:
            tracking.finish_run(uri, row["run_id"], failed=True)
        elif row["stopped_early"]:  # its trainer was ended with the trial: the run stayed RUNNING
            tracking.finish_run(uri, row["run_id"], status="KILLED")
    scored = [r for r in rows if r[metric] is not None and math.isfinite(r[metric])]
    if not scored:
        tracking.finish_run(uri, parent, failed=True)
        raise RuntimeError("no trial reported a finite " + metric)
    pick = min if METRICS[metric] == "min" else max
    best = pick(scored, key=lambda r: r[metric])
    tracking.log_params(uri, parent, {f"best.{k}": best[k] for k in specs})
    tracking.log_metrics(uri, parent, {metric: best[metric], "trials": len(rows),
                                       "trials_stopped_early": sum(r["stopped_early"] for r in rows)})
    tracking.set_tag(uri, parent, "best_trial", best["trial"])
    tracking.set_tag(uri, parent, "best_run_id", str(best["run_id"]))
    tracking.finish_run(uri, parent)
    return best


def format_table(rows: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    """The sweep's table, one line per trial: id, searched values, metric, epoch, how it ended."""
    header = ["trial", *keys, metric, "epoch", "ended"]
    lines = [header]
    for r in rows:
        ended = "error" if r["error"] else "stopped early" if r["stopped_early"] else "finished"
        value = r[metric]
        lines.append([r["trial"], *(_fmt(r[k]) for k in keys), "-" if value is None else f"{value:.4f}",
                      str(r["epoch"]), ended])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_sweep_record(path: str, record: dict[str, Any]) -> None:
    """`sweep.json` in the sweep's folder: its MLflow parent run, for --resume."""
    write_atomic(f"{path}/sweep.json", json.dumps(record).encode())


def read_sweep_record(path: str) -> dict[str, Any]:
    return json.loads(read_bytes(f"{path}/sweep.json"))

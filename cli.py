"""mrcnn-cli: the command line of mrcnn-pipeline.

Thin by design: each command checks its arguments, builds the typed config and calls a plain function in
`pipelines/` that tests import without the CLI. Results go to stdout; the stages' progress lines go through
`pipelines.infra.logs` (stderr, `[stage] message`). Each command imports its stage when it runs, so that
`mrcnn-cli --help` and argument errors answer without importing torch, Ray or MLflow.

The options the commands share (Ray address, MLflow store and experiment, workers, GPUs, --verbose, --config /
--set) are declared once in `pipelines/cli_options.py` and become one `RunContext` per command. Every command goes
through its one error-to-message mapping (`user_error`): an error the user caused ends in a short message and exit
status 2, without a traceback unless --verbose; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from mrcnn.config import Layers, load_config
from pipelines.cli_deploy import COMMANDS
from pipelines.cli_options import (
    DEFAULT_EXPERIMENT,
    AddressOpt,
    App,
    ConfigOpt,
    CpusOpt,
    ExperimentOpt,
    GpuOpt,
    MetricOpt,
    ModelConfigOpt,
    ModelSetOpt,
    PlacementOpt,
    RegisterOpt,
    SchedulerOpt,
    SearchOpt,
    SetOpt,
    TrackingOpt,
    VerboseOpt,
    WorkersOpt,
    console,
    placement,
    run_context,
)
from pipelines.infra.logs import setup_logging

# choices of options whose modules are too heavy to import for `--help`; tests/cli checks they match the code's
Backend = Literal["pycocotools", "faster-coco-eval"]  # pipelines.data.coco_metrics.BACKENDS
DagStage = Literal["preprocess", "train", "evaluate"]  # pipelines.dag.pipeline_stages
InspectStage = Literal["gt", "anchors", "rpn-targets", "mini-masks", "deltas", "proposals", "detection-targets",
                       "batch", "predictions", "all"]  # pipelines.inspection.command.STAGES + "all"


app = App(
    no_args_is_help=True,
    help="Mask R-CNN training as a distributed pipeline on Ray.\n\n"
    "Example: mrcnn-cli demo --out demo_out   (synthetic data -> shards -> training -> COCO evaluation)",
)


@app.callback()
def _main() -> None:
    setup_logging()


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (COCO 2017 layout).")],
    train: Annotated[int, typer.Option(help="Training images.")] = 200,
    val: Annotated[int, typer.Option(help="Validation images.")] = 50,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
) -> None:
    """Write the synthetic COCO-format shapes dataset.

    Example: mrcnn-cli synth data/shapes --train 200 --val 50 --seed 0
    """
    from pipelines.data.synth import make_synthetic_dataset

    info = make_synthetic_dataset(out, train=train, val=val, seed=seed)
    typer.echo(f"wrote {info}")


@app.command()
def preprocess(
    out: Annotated[str, typer.Option("--out", help="Shards folder or URI (s3://, gs://).")],
    dataset: Annotated[str | None, typer.Option(help="COCO-layout dataset folder or URI.")] = None,
    split: Annotated[list[str] | None, typer.Option("--split", help="Split name, repeatable.")] = None,
    annotations: Annotated[str | None, typer.Option(help="Annotations JSON (other layouts).")] = None,
    images: Annotated[str | None, typer.Option(help="Images folder (with --annotations).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a complete output.")] = False,
    config: ConfigOpt = "coco",
    set_: SetOpt = None,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Turn a COCO dataset into Parquet shards (source image bytes, mini-masks, RPN targets) with Ray Data.

    Example: mrcnn-cli preprocess --dataset data/shapes --split train2017 --split val2017 --out shards --config shapes
    """
    from pipelines.data.coco import split_paths
    from pipelines.data.preprocess import preprocess as run_preprocess

    cfg = load_config(config, set_ or [])
    console("preprocess", verbose)
    if annotations or images:
        if not (annotations and images):
            raise typer.BadParameter("--annotations and --images go together")
        name = (split or [Path(annotations).stem.removeprefix("instances_")])[0]
        splits = [(name, annotations, images)]
    else:
        if not dataset or not split:
            raise typer.BadParameter("give --dataset DIR --split NAME (or --annotations FILE --images DIR)")
        splits = [(s, *split_paths(dataset, s)) for s in split]
    manifest = run_preprocess(cfg, splits=splits, out=out, overwrite=overwrite, ctx=run_context(address))
    typer.echo(f"manifest: {manifest}")


@app.command()
def train(
    shards: Annotated[str, typer.Option(help="Shards folder or URI written by preprocess.")],
    split: Annotated[str, typer.Option(help="Training split.")] = "train2017",
    val_split: Annotated[str, typer.Option(help="Validation split (validation loss every epoch).")] = "val2017",
    workers: WorkersOpt = 1,
    gpu: GpuOpt = None,
    epochs: Annotated[int | None, typer.Option(help="Train this many epochs.")] = None,
    steps: Annotated[int | None, typer.Option(help="Train this many steps (overrides epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per worker per step.")] = None,
    layers: Annotated[Layers | None, typer.Option(help="The ResNet stages trained (matterport's names).")] = None,
    init: Annotated[str | None, typer.Option(
        "--init", "--model-path",
        help="Weights to start from (a path or URI): our checkpoint to fine-tune, an MLflow model (runs:/, models:/) "
             "or torchvision:FILE (torchvision's Mask R-CNN v1 or ImageNet ResNet state dict; use --config "
             "torchvision). Class layers of another class count are re-initialised.")] = None,
    backbone_weights: Annotated[str | None, typer.Option(
        help="torchvision ResNet state dict file (a path or URI).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint under --storage.")] = False,
    storage: Annotated[str | None, typer.Option(help="Checkpoint storage path or URI (required on clusters).")] = None,
    run_name: Annotated[str | None, typer.Option(help="Ray Train / MLflow run name.")] = None,
    register: RegisterOpt = None,
    experiment: ExperimentOpt = DEFAULT_EXPERIMENT,
    cpus_per_worker: CpusOpt = None,
    placement_strategy: PlacementOpt = "PACK",
    config: ConfigOpt = "coco",
    set_: SetOpt = None,
    address: AddressOpt = None,
    tracking_uri: TrackingOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train Mask R-CNN data-parallel with Ray Train (DDP), checkpoints, resume and MLflow tracking.

    Example: mrcnn-cli train --shards shards --workers 2 --no-gpu --steps 200 --config shapes --storage ckpt

    From torchvision's COCO weights, matterport's stages (shards preprocessed with --config torchvision):
    mrcnn-cli train --shards shards --config torchvision --init torchvision:maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth
    --layers heads, then --init <its checkpoint> --layers 4+, then --layers all
    """
    from pipelines.training.train import TrainRequest
    from pipelines.training.train import train as run_train

    strategy = placement(placement_strategy)
    cfg = load_config(config, set_ or [])
    console("train", verbose)
    request = TrainRequest(
        shards=shards, split=split, val_split=val_split, epochs=epochs, steps=steps, batch_size=batch_size,
        layers=layers, model_path=init, backbone_weights=backbone_weights, resume=resume, run_name=run_name,
        cpus_per_worker=cpus_per_worker, placement_strategy=strategy, register=register,
    )
    result = run_train(cfg, request, run_context(address, tracking_uri, experiment, workers, gpu, storage))
    typer.echo(f"checkpoint: {result.checkpoint}\nbest: {result.best_checkpoint}\nmlflow run: {result.run_id}")


@app.command()
def tune(
    shards: Annotated[str, typer.Option(help="Shards folder or URI written by preprocess.")],
    search: SearchOpt,
    samples: Annotated[int, typer.Option(help="Draws of the search space (each grid value this many times).")] = 1,
    workers_per_trial: Annotated[int, typer.Option(help="Data-parallel workers of each trial.")] = 1,
    gpu: GpuOpt = None,
    scheduler: SchedulerOpt = "asha",
    metric: MetricOpt = "val_loss",
    grace_period: Annotated[int, typer.Option(help="Epochs every trial runs before ASHA may stop it.")] = 1,
    max_concurrent: Annotated[int | None, typer.Option(
        help="Trials at once, at most (default: as many as the cluster's GPUs or CPUs hold).")] = None,
    split: Annotated[str, typer.Option(help="Training split.")] = "train2017",
    val_split: Annotated[str, typer.Option(help="Validation split (the metric, every epoch).")] = "val2017",
    name: Annotated[str | None, typer.Option(help="Sweep name: its folder under --storage, its MLflow run.")] = None,
    storage: Annotated[str | None, typer.Option(help="Sweep storage path or URI (default ./tune_results).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the sweep --name under --storage.")] = False,
    experiment: ExperimentOpt = DEFAULT_EXPERIMENT,
    cpus_per_worker: CpusOpt = None,
    config: ConfigOpt = "coco",
    set_: SetOpt = None,
    address: AddressOpt = None,
    tracking_uri: TrackingOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Hyperparameter sweep on Ray Tune: every trial our training, ASHA early stopping, one MLflow run per trial.

    Example: mrcnn-cli tune --shards shards --config shapes --set train.steps=0 --set train.epochs=4 --no-gpu
    --search 'train.lr=loguniform(1e-4,1e-2)' --search 'roi.rois_per_image=choice(32,64,128)' --samples 8

    By segm AP (a quick COCO evaluation of the first 100 validation images each epoch): add --metric segm_AP
    (--set train.val_ap_images=N for another count).
    """
    from pipelines.infra.tracking import ui_command, ui_url
    from pipelines.training.tune import TuneRequest, format_table, view_key
    from pipelines.training.tune import tune as run_tune

    cfg = load_config(config, set_ or [])
    console("tune", verbose)
    request = TuneRequest(shards=shards, searches=tuple(search), samples=samples, scheduler=scheduler, metric=metric,
                          grace_period=grace_period, max_concurrent=max_concurrent, name=name, resume=resume,
                          split=split, val_split=val_split, cpus_per_worker=cpus_per_worker)
    ctx = run_context(address, tracking_uri, experiment, workers_per_trial, gpu, storage)
    result = run_tune(cfg, request, ctx)
    keys = [s.partition("=")[0].strip() for s in search]
    typer.echo(format_table(result.rows, keys, metric))
    best = result.best
    typer.echo(f"best: {best['trial']} {metric}={best[metric]:.4f}\ncheckpoint: {best['checkpoint']}\n"
               f"mlflow run: {best['run_id']} (sweep {result.parent_run_id})\nsweep: {result.path}")
    uri = ctx.mlflow_uri()
    typer.echo(f"MLflow UI: {ui_command(uri)}\n  then {ui_url(uri, experiment, view=view_key(result.name))}")


@app.command()
def evaluate(
    shards: Annotated[str, typer.Option(help="Shards folder or URI written by preprocess.")],
    model_path: Annotated[str, typer.Option(help="Checkpoint directory, MLflow model URI (runs:/ID/model) or "
                                                 "torchvision:FILE (torchvision's Mask R-CNN v1 state dict).")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "val2017",
    annotations: Annotated[str | None, typer.Option(help="Ground truth; default: the manifest's.")] = None,
    workers: WorkersOpt = 1,
    gpu: GpuOpt = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first K images only.")] = None,
    out: Annotated[str, typer.Option(help="Folder for metrics.json, detections.json, plots.")] = "eval_out",
    backend: Annotated[Backend, typer.Option(help="COCO evaluation library.")] = "pycocotools",
    config: ModelConfigOpt = None,
    set_: ModelSetOpt = None,
    experiment: ExperimentOpt = DEFAULT_EXPERIMENT,
    address: AddressOpt = None,
    tracking_uri: TrackingOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Batch inference over a split's shards and COCO bbox/segm evaluation (pycocotools), logged to MLflow.

    Example: mrcnn-cli evaluate --shards shards --split val2017 --model-path checkpoints/train/checkpoint_000003
    """
    from pipelines.evaluation.evaluate import EvaluateRequest
    from pipelines.evaluation.evaluate import evaluate as run_evaluate

    console("evaluate", verbose)
    request = EvaluateRequest(shards=shards, model_path=model_path, split=split, annotations=annotations,
                              limit=limit, out=out, backend=backend, overrides=tuple(set_ or ()), config_path=config)
    result = run_evaluate(request, run_context(address, tracking_uri, experiment, workers, gpu))
    typer.echo(result.table)
    typer.echo(f"metrics: {Path(result.out) / 'metrics.json'}  mlflow run: {result.run_id}")


@app.command()
def run(
    dataset: Annotated[str, typer.Option(help="COCO-layout dataset folder or URI.")],
    train_split: Annotated[str, typer.Option(help="Training split.")] = "train2017",
    val_split: Annotated[str, typer.Option(help="Validation split.")] = "val2017",
    workers: WorkersOpt = 1,
    gpu: GpuOpt = None,
    work_dir: Annotated[str, typer.Option(help="Where stage outputs live, keyed by fingerprint: a folder or URI "
                                               "(s3://, gs://, file://).")] = "pipeline_out",
    force: Annotated[DagStage | None, typer.Option(help="Rerun from this stage.")] = None,
    init: Annotated[str | None, typer.Option(help="Train from these weights: our checkpoint, or torchvision:FILE "
                                                  "(with --config torchvision).")] = None,
    register: RegisterOpt = None,
    cpus_per_worker: CpusOpt = None,
    placement_strategy: PlacementOpt = "PACK",
    experiment: ExperimentOpt = DEFAULT_EXPERIMENT,
    config: ConfigOpt = "coco",
    set_: SetOpt = None,
    address: AddressOpt = None,
    tracking_uri: TrackingOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run preprocess -> train -> evaluate as a DAG; stages whose inputs did not change are skipped.

    Example: mrcnn-cli run --dataset data/shapes --config shapes --workers 1 --no-gpu

    Fine-tuning torchvision's COCO Mask R-CNN on a COCO-format dataset (DIR/annotations/instances_train2017.json ...):
    mrcnn-cli run --dataset DIR --config torchvision --init torchvision:maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --gpu
    """
    from pipelines.dag import PipelineRequest, run_pipeline
    from pipelines.infra.tracking import ui_command, ui_url

    strategy = placement(placement_strategy)
    cfg = load_config(config, set_ or [])
    console("run", verbose, work_dir)
    ctx = run_context(address, tracking_uri, experiment, workers, gpu)
    request = PipelineRequest(dataset=dataset, train_split=train_split, val_split=val_split, work_dir=work_dir,
                              force=force, cpus_per_worker=cpus_per_worker, placement_strategy=strategy, init=init,
                              register=register)
    result = run_pipeline(cfg, request, ctx)
    typer.echo(f"ran: {', '.join(result.ran) or 'nothing'}; skipped: {', '.join(result.skipped) or 'nothing'}")
    typer.echo(result.outputs["evaluate"]["table"])
    uri = ctx.mlflow_uri()
    typer.echo(f"MLflow UI: {ui_command(uri)}\n  then {ui_url(uri, experiment)}")


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Folder for the dataset, stage outputs and the MLflow store.")] = "demo_out",
    train: Annotated[int, typer.Option(help="Synthetic training images.")] = 1000,
    val: Annotated[int, typer.Option(help="Synthetic validation images.")] = 50,
    workers: WorkersOpt = 2,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs (and torch threads) per train worker.")] = 1,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """The whole pipeline on the built-in synthetic dataset with the `shapes` preset, on a local Ray.

    Everything it writes stays under --out: the dataset, the stages' outputs, the MLflow store (`mlflow.db`,
    artifacts in `mlartifacts/`) and the log file of Ray's and the libraries' messages (`logs/`).

    Example: mrcnn-cli demo --out demo_out
    """
    import time

    from pipelines.dag import PipelineRequest, run_pipeline
    from pipelines.data.synth import make_synthetic_dataset
    from pipelines.infra.tracking import ui_command, ui_url

    started = time.perf_counter()
    cfg = load_config("shapes", ["train.cache_data=true", *(set_ or [])])
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log_file = console("demo", verbose, root)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"  # its own store, whatever MLFLOW_TRACKING_URI says
    dataset = root / "shapes"
    if not (dataset / "annotations" / "instances_val2017.json").is_file():
        make_synthetic_dataset(dataset, train=train, val=val, seed=0)
    # one local node: the small splits are decoded once into the object store (a new stream per epoch costs
    # 7-9 s on 2 cores); on a cluster cached blocks would be lost with their node, so only the demo does this
    # (train.cache_data=true above)
    result = run_pipeline(
        cfg,
        PipelineRequest(dataset=str(dataset), work_dir=str(root / "pipeline"), cpus_per_worker=cpus_per_worker),
        run_context(tracking_uri=tracking_uri, workers=workers, gpu=False),
    )
    evaluation = result.outputs["evaluate"]
    metrics = evaluation["metrics"]
    typer.echo(evaluation["table"])
    typer.echo(
        f"segm AP {metrics['segm/AP']:.3f}  AP50 {metrics['segm/AP50']:.3f}  |  "
        f"bbox AP {metrics['bbox/AP']:.3f}  AP50 {metrics['bbox/AP50']:.3f}"
    )
    picture = Path(evaluation["out"]) / "predictions.png"
    typer.echo(f"predictions: {picture}" if picture.is_file() else f"predictions: none drawn (see {log_file})")
    typer.echo(f"demo finished in {time.perf_counter() - started:.0f} s (dataset, Ray start-up and all stages)")
    typer.echo(f"Ray's and the libraries' messages: {log_file}")
    typer.echo(f"Open the MLflow UI on these runs (or `make ui`):\n  {ui_command(tracking_uri)}\n"
               f"then {ui_url(tracking_uri)}")


@app.command("inspect")
def inspect_command(
    stage: Annotated[InspectStage, typer.Argument(help="The sub-net to draw; `all`: every one into a folder.")],
    out: Annotated[str, typer.Option("--out", help="PNG file to write; a folder for `all`.")],
    shards: Annotated[str | None, typer.Option(help="Shards folder or URI (their config is used).")] = None,
    dataset: Annotated[str | None, typer.Option(help="COCO-layout dataset instead of shards (not for batch).")] = None,
    split: Annotated[str, typer.Option(help="Split to take the image from.")] = "val2017",
    image_id: Annotated[int | None, typer.Option(help="The image with this COCO id.")] = None,
    index: Annotated[int, typer.Option(help="Else the image at this position of the split.")] = 0,
    model_path: Annotated[str | None, typer.Option(help="Checkpoint, MLflow model URI or torchvision:FILE; default: "
                                                        "untrained.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Detection score threshold (predictions).")] = None,
    step: Annotated[int, typer.Option(help="Train step whose flip augmentation `batch` shows.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the samplers and of an untrained model.")] = 0,
    mlflow_run: Annotated[str | None, typer.Option(help="Log the picture(s) to this MLflow run.")] = None,
    experiment: ExperimentOpt = DEFAULT_EXPERIMENT,
    tracking_uri: TrackingOpt = None,
    config: ConfigOpt = "coco",
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Draw one sub-net's work as a titled picture with its numbers (anchors, RPN targets, mini-masks, ...).

    Example: mrcnn-cli inspect rpn-targets --shards shards --split val2017 --index 3 --out rpn.png
    """
    from pipelines.inspection.command import InspectRequest, run_inspect

    if not (shards or dataset) and stage != "anchors":
        raise typer.BadParameter("give --shards SHARDS or --dataset DATASET (with --split)")
    request = InspectRequest(
        stage=stage, out=out, shards=shards, dataset=dataset, split=split, image_id=image_id, index=index,
        model_path=model_path, config=load_config(config, set_ or []), threshold=threshold, step=step, seed=seed,
        mlflow_run=mlflow_run, model_overrides=tuple(set_ or ()) if model_path else (),
    )
    results = run_inspect(request, run_context(tracking_uri=tracking_uri, experiment=experiment))
    for name, info in results.items():
        typer.echo(f"{name}: {info if isinstance(info, str) else info.get('path', info.get('skipped'))}")


for name, command in COMMANDS.items():  # predict, serve, export: pipelines/cli_deploy.py
    app.command(name)(command)


if __name__ == "__main__":
    app()

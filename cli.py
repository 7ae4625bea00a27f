"""mrcnn-cli: the command line of mrcnn-pipeline.

Thin by design: each command checks its arguments, builds the typed config and calls a plain function in
`pipelines/` that tests import without the CLI. Results go to stdout; the stages' progress lines go through
`pipelines.infra.logs` (stderr, `[stage] message`). Each command imports its stage when it runs, so that
`mrcnn-cli --help` and argument errors answer without importing torch, Ray or MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from mrcnn.config import Layers
from pipelines.infra.logs import get_logger, setup_logging
from pipelines.infra.storage import is_uri

# choices of options whose modules are too heavy to import for `--help`; tests/cli checks they match the code's
Backend = Literal["pycocotools", "faster-coco-eval"]  # pipelines.evaluation.coco_eval.BACKENDS
DagStage = Literal["preprocess", "train", "evaluate"]  # pipelines.dag.pipeline_stages
InspectStage = Literal["gt", "anchors", "rpn-targets", "mini-masks", "deltas", "proposals", "detection-targets",
                       "batch", "predictions", "all"]  # pipelines.inspection.command.STAGES + "all"

app = typer.Typer(
    no_args_is_help=True,
    help="Mask R-CNN training as a distributed pipeline on Ray.\n\n"
    "Example: mrcnn-cli demo --out demo_out   (synthetic data -> shards -> training -> COCO evaluation)",
)

log = get_logger("cli")


@app.callback()
def _main() -> None:
    setup_logging()


VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Show Ray's and the libraries' own messages and warnings "
                                                            "on the console too (else only in the log file).")]


def _console(command: str, verbose: bool, folder: str | Path | None = None) -> Path:
    """The console keeps the project's lines; Ray's and the libraries' messages and warnings go to a log file
    (also shown with --verbose): `<folder>/logs/` for a local output folder, else the temporary folder."""
    import tempfile
    import time

    local = folder is not None and not is_uri(str(folder))
    where = Path(folder) / "logs" if local else Path(tempfile.gettempdir()) / "mrcnn-cli"
    path = (where / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log").resolve()
    setup_logging(log_file=path, verbose=verbose)
    log.info("Ray's and the libraries' messages: %s%s", path, "" if verbose else " (--verbose shows them here)")
    return path


ConfigOpt = Annotated[str, typer.Option("--config", help="Preset (coco, shapes, torchvision) or a YAML file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override, repeatable: section.field=value.")]
PlacementOpt = Annotated[
    str,
    typer.Option(help="Placement of the train workers: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (one per node)."),
]
AddressOpt = Annotated[
    str | None, typer.Option("--address", envvar="RAY_ADDRESS", help="Ray cluster address; default: a local Ray.")
]


def _placement(strategy: str) -> str:
    from pipelines.training.train import PLACEMENT_STRATEGIES

    if strategy.upper() not in PLACEMENT_STRATEGIES:
        raise typer.BadParameter(f"{strategy!r}: one of {', '.join(PLACEMENT_STRATEGIES)}",
                                 param_hint="--placement-strategy")
    return strategy.upper()


def _config(config: str, overrides: list[str] | None):
    from mrcnn.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config/--set") from exc


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
    from pipelines.infra.ray_env import init_ray

    cfg = _config(config, set_)
    _console("preprocess", verbose)
    if annotations or images:
        if not (annotations and images):
            raise typer.BadParameter("--annotations and --images go together")
        name = (split or [Path(annotations).stem.removeprefix("instances_")])[0]
        splits = [(name, annotations, images)]
    else:
        if not dataset or not split:
            raise typer.BadParameter("give --dataset DIR --split NAME (or --annotations FILE --images DIR)")
        splits = [(s, *split_paths(dataset, s)) for s in split]
    init_ray(address)
    manifest = run_preprocess(cfg, splits=splits, out=out, overwrite=overwrite)
    typer.echo(f"manifest: {manifest}")


@app.command()
def train(
    shards: Annotated[str, typer.Option(help="Shards folder or URI written by preprocess.")],
    split: Annotated[str, typer.Option(help="Training split.")] = "train2017",
    val_split: Annotated[str, typer.Option(help="Validation split (validation loss every epoch).")] = "val2017",
    workers: Annotated[int, typer.Option(help="Data-parallel workers (one GPU each with --gpu).")] = 1,
    gpu: Annotated[bool | None, typer.Option("--gpu/--no-gpu", help="Default: GPUs when the cluster has them.")] = None,
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
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "mrcnn-pipeline",
    cpus_per_worker: Annotated[float | None, typer.Option(
        help="CPUs reserved per train worker (default: 2 with GPUs, 1 without).")] = None,
    placement_strategy: PlacementOpt = "PACK",
    config: ConfigOpt = "coco",
    set_: SetOpt = None,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train Mask R-CNN data-parallel with Ray Train (DDP), checkpoints, resume and MLflow tracking.

    Example: mrcnn-cli train --shards shards --workers 2 --no-gpu --steps 200 --config shapes --storage ckpt

    From torchvision's COCO weights, matterport's stages (shards preprocessed with --config torchvision):
    mrcnn-cli train --shards shards --config torchvision --init torchvision:maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth
    --layers heads, then --init <its checkpoint> --layers 4+, then --layers all
    """
    from mrcnn.config import ConfigError
    from mrcnn.torchvision_weights import WeightsFormatError
    from pipelines.training.train import TrainRequest
    from pipelines.training.train import train as run_train

    strategy = _placement(placement_strategy)
    cfg = _config(config, set_)
    _console("train", verbose)
    request = TrainRequest(
        shards=shards,
        split=split,
        val_split=val_split,
        workers=workers,
        use_gpu=gpu,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        layers=layers,
        model_path=init,
        backbone_weights=backbone_weights,
        resume=resume,
        storage=storage,
        run_name=run_name,
        experiment=experiment,
        cpus_per_worker=cpus_per_worker,
        placement_strategy=strategy,
        address=address,
    )
    try:
        result = run_train(cfg, request)
    except WeightsFormatError as exc:
        raise typer.BadParameter(str(exc), param_hint="--init") from exc
    except ConfigError as exc:  # settings valid on their own that training cannot use together (train.flip)
        raise typer.BadParameter(str(exc), param_hint="--config/--set") from exc
    typer.echo(f"checkpoint: {result.checkpoint}\nbest: {result.best_checkpoint}\nmlflow run: {result.run_id}")


@app.command()
def evaluate(
    shards: Annotated[str, typer.Option(help="Shards folder or URI written by preprocess.")],
    model_path: Annotated[str, typer.Option(help="Checkpoint directory, MLflow model URI (runs:/ID/model) or "
                                                 "torchvision:FILE (torchvision's Mask R-CNN v1 state dict).")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "val2017",
    annotations: Annotated[str | None, typer.Option(help="Ground truth; default: the manifest's.")] = None,
    workers: Annotated[int, typer.Option(help="Inference actors (one model each).")] = 1,
    gpu: Annotated[bool | None, typer.Option("--gpu/--no-gpu", help="Default: GPUs when the cluster has them.")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first K images only.")] = None,
    out: Annotated[str, typer.Option(help="Folder for metrics.json, detections.json, plots.")] = "eval_out",
    backend: Annotated[Backend, typer.Option(help="COCO evaluation library.")] = "pycocotools",
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "mrcnn-pipeline",
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Batch inference over a split's shards and COCO bbox/segm evaluation (pycocotools), logged to MLflow.

    Example: mrcnn-cli evaluate --shards shards --split val2017 --model-path checkpoints/train/checkpoint_000003
    """
    from mrcnn.torchvision_weights import WeightsFormatError
    from pipelines.evaluation.evaluate import EvaluateRequest
    from pipelines.evaluation.evaluate import evaluate as run_evaluate
    from pipelines.models import ModelMismatchError

    _console("evaluate", verbose)
    try:
        result = run_evaluate(
            EvaluateRequest(
                shards=shards, model_path=model_path, split=split, annotations=annotations, workers=workers,
                use_gpu=gpu, limit=limit, out=out, backend=backend, experiment=experiment, address=address,
            )
        )
    except (WeightsFormatError, ModelMismatchError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--model-path") from exc
    typer.echo(result.table)
    typer.echo(f"metrics: {Path(result.out) / 'metrics.json'}  mlflow run: {result.run_id}")


@app.command()
def run(
    dataset: Annotated[str, typer.Option(help="COCO-layout dataset folder or URI.")],
    train_split: Annotated[str, typer.Option(help="Training split.")] = "train2017",
    val_split: Annotated[str, typer.Option(help="Validation split.")] = "val2017",
    workers: Annotated[int, typer.Option(help="Data-parallel train workers.")] = 1,
    gpu: Annotated[bool | None, typer.Option("--gpu/--no-gpu", help="Default: GPUs when the cluster has them.")] = None,
    work_dir: Annotated[str, typer.Option(help="Where stage outputs live, keyed by fingerprint: a folder or URI "
                                               "(s3://, gs://, file://).")] = "pipeline_out",
    force: Annotated[DagStage | None, typer.Option(help="Rerun from this stage.")] = None,
    init: Annotated[str | None, typer.Option(help="Train from these weights: our checkpoint, or torchvision:FILE "
                                                  "(with --config torchvision).")] = None,
    cpus_per_worker: Annotated[float | None, typer.Option(
        help="CPUs reserved per train worker (default: 2 with GPUs, 1 without).")] = None,
    placement_strategy: PlacementOpt = "PACK",
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "mrcnn-pipeline",
    config: ConfigOpt = "coco",
    set_: SetOpt = None,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run preprocess -> train -> evaluate as a DAG; stages whose inputs did not change are skipped.

    Example: mrcnn-cli run --dataset data/shapes --config shapes --workers 1 --no-gpu

    Fine-tuning torchvision's COCO Mask R-CNN on a COCO-format dataset (DIR/annotations/instances_train2017.json ...):
    mrcnn-cli run --dataset DIR --config torchvision --init torchvision:maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --gpu
    """
    from pipelines.dag import PipelineRequest, run_pipeline
    from pipelines.infra.tracking import resolve_tracking_uri, ui_command, ui_url

    strategy = _placement(placement_strategy)
    cfg = _config(config, set_)
    _console("run", verbose, work_dir)
    result = run_pipeline(
        cfg,
        PipelineRequest(
            dataset=dataset, train_split=train_split, val_split=val_split, workers=workers, use_gpu=gpu,
            work_dir=work_dir, force=force, address=address, experiment=experiment, cpus_per_worker=cpus_per_worker,
            placement_strategy=strategy, init=init,
        ),
    )
    typer.echo(f"ran: {', '.join(result.ran) or 'nothing'}; skipped: {', '.join(result.skipped) or 'nothing'}")
    typer.echo(result.outputs["evaluate"]["table"])
    uri = resolve_tracking_uri()
    typer.echo(f"MLflow UI: {ui_command(uri)}\n  then {ui_url(uri, experiment)}")


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Folder for the dataset, stage outputs and the MLflow store.")] = "demo_out",
    train: Annotated[int, typer.Option(help="Synthetic training images.")] = 1000,
    val: Annotated[int, typer.Option(help="Synthetic validation images.")] = 50,
    workers: Annotated[int, typer.Option(help="Train workers (DDP).")] = 2,
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
    cfg = _config("shapes", ["train.cache_data=true", *(set_ or [])])
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log_file = _console("demo", verbose, root)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"  # its own store, whatever MLFLOW_TRACKING_URI says
    dataset = root / "shapes"
    if not (dataset / "annotations" / "instances_val2017.json").is_file():
        make_synthetic_dataset(dataset, train=train, val=val, seed=0)
    # one local node: the small splits are decoded once into the object store (a new stream per epoch costs
    # 7-9 s on 2 cores); on a cluster cached blocks would be lost with their node, so only the demo does this
    # (train.cache_data=true above)
    result = run_pipeline(
        cfg,
        PipelineRequest(dataset=str(dataset), workers=workers, use_gpu=False, work_dir=str(root / "pipeline"),
                        cpus_per_worker=cpus_per_worker, tracking_uri=tracking_uri),
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
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the run `all` creates.")] = "mrcnn-pipeline",
    config: ConfigOpt = "coco",
    set_: SetOpt = None,
) -> None:
    """Draw one sub-net's work as a titled picture with its numbers (anchors, RPN targets, mini-masks, ...).

    Example: mrcnn-cli inspect rpn-targets --shards shards --split val2017 --index 3 --out rpn.png
    """
    from pipelines.inspection.command import InspectRequest, run_inspect

    if not (shards or dataset) and stage != "anchors":
        raise typer.BadParameter("give --shards SHARDS or --dataset DATASET (with --split)")
    request = InspectRequest(
        stage=stage, out=out, shards=shards, dataset=dataset, split=split, image_id=image_id, index=index,
        model_path=model_path, config=_config(config, set_), threshold=threshold, step=step, seed=seed,
        mlflow_run=mlflow_run, experiment=experiment,
    )
    try:
        results = run_inspect(request)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    for name, info in results.items():
        typer.echo(f"{name}: {info if isinstance(info, str) else info.get('path', info.get('skipped'))}")


@app.command("predict")
def predict_command(
    images: Annotated[list[str], typer.Argument(help="JPEG / PNG files or folders of them.")],
    model_path: Annotated[str, typer.Option(help="Checkpoint directory, MLflow model URI (runs:/ID/model) or "
                                                 "torchvision:FILE (COCO's 80 categories).")],
    out: Annotated[str, typer.Option("--out", help="Folder for predictions.json, images.json and pictures.")],
    threshold: Annotated[float | None, typer.Option(help="Minimum score; default the model's own.")] = None,
    gpu: Annotated[bool | None, typer.Option("--gpu/--no-gpu", help="Default: a GPU when there is one.")] = None,
) -> None:
    """Run a model on any images: a picture per image and COCO results (original pixels, RLE masks).

    Example: mrcnn-cli predict photos/ street.jpg --model-path runs:/RUN_ID/model --out predictions --threshold 0.5
    """
    from mrcnn.torchvision_weights import WeightsFormatError
    from pipelines.evaluation.predict import predict_images
    from pipelines.models import ModelMismatchError

    device = None if gpu is None else ("cuda" if gpu else "cpu")
    try:
        result = predict_images(images, model_path, out, threshold=threshold, device=device)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc)) from exc
    except (WeightsFormatError, ModelMismatchError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--model-path") from exc
    typer.echo(f"{len(result.images)} images, {result.num_detections} detections -> {result.predictions}")


if __name__ == "__main__":
    app()

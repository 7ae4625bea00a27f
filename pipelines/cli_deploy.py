"""The commands past the checkpoint: `predict` (files in, pictures and COCO results out), `serve` (an HTTP
endpoint on Ray Serve) and `export` (ONNX). Plain functions with typer's annotations, registered on the app by
`cli.py` (`COMMANDS`); thin like the rest: each checks its arguments and calls its stage, imported when it runs.
"""

from __future__ import annotations

from typing import Annotated

import typer

from pipelines.cli_options import (
    AddressOpt,
    GpuOpt,
    ModelConfigOpt,
    ModelSetOpt,
    TrackingOpt,
    VerboseOpt,
    console,
    run_context,
)


def predict_command(
    images: Annotated[list[str], typer.Argument(help="JPEG / PNG files or folders of them.")],
    out: Annotated[str, typer.Option("--out", help="Folder for predictions.json, images.json and pictures.")],
    model_path: Annotated[str | None, typer.Option(help="Checkpoint directory, MLflow model URI (runs:/ID/model) or "
                                                        "torchvision:FILE (COCO's 80 categories).")] = None,
    onnx: Annotated[str | None, typer.Option(help="A model exported by `mrcnn-cli export`, run in onnxruntime "
                                                  "(CPU), instead of --model-path.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Minimum score; default the model's own.")] = None,
    gpu: GpuOpt = None,
    config: ModelConfigOpt = None,
    set_: ModelSetOpt = None,
    tracking_uri: TrackingOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a model on any images: a picture per image and COCO results (original pixels, RLE masks).

    Example: mrcnn-cli predict photos/ street.jpg --model-path runs:/RUN_ID/model --out predictions --threshold 0.5
    """
    from pipelines.evaluation.predict import predict_images

    if (model_path is None) == (onnx is None):
        raise typer.BadParameter("give one of --model-path and --onnx", param_hint="--model-path/--onnx")
    device = None if gpu is None else ("cuda" if gpu else "cpu")
    if onnx is not None and (config or set_):
        raise typer.BadParameter("an exported model carries its settings: --set / --config apply to --model-path",
                                 param_hint="--set/--config")
    result = predict_images(images, model_path, out, threshold=threshold, device=device, tracking_uri=tracking_uri,
                            overrides=set_ or [], config_path=config, onnx=onnx)
    typer.echo(f"{len(result.images)} images, {result.num_detections} detections -> {result.predictions}")


def serve_command(
    model_path: Annotated[str, typer.Option(help="Checkpoint directory, MLflow model URI (runs:/ID/model, "
                                                 "models:/NAME/VERSION, models:/NAME@ALIAS) or torchvision:FILE.")],
    gpu: GpuOpt = None,
    replicas: Annotated[int, typer.Option(help="Model replicas (one GPU each with --gpu).")] = 1,
    autoscale: Annotated[str | None, typer.Option(help="MIN:MAX replicas, autoscaled on ongoing requests "
                                                       "(instead of --replicas).")] = None,
    max_batch: Annotated[int, typer.Option(help="Images per model call at most (@serve.batch).")] = 8,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a batch waits to fill.")] = 10.0,
    max_pixels: Annotated[int | None, typer.Option(help="Refuse images of more pixels (default 40,000,000).")] = None,
    cpus_per_replica: Annotated[int | None, typer.Option(
        help="CPUs (and torch threads) of a CPU replica; default: the cluster's CPUs but one, shared.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    write_config: Annotated[str | None, typer.Option(
        help="Write the config `serve deploy` takes to this YAML file, and start nothing.")] = None,
    config: ModelConfigOpt = None,
    set_: ModelSetOpt = None,
    address: AddressOpt = None,
    tracking_uri: TrackingOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve a model over HTTP on Ray Serve (POST /v1/predict, GET /v1/health, /v1/model, /docs) until Ctrl-C.

    Example: mrcnn-cli serve --model-path models:/shapes@champion --no-gpu --replicas 2 --port 8000
    then: curl -X POST -H 'Content-Type: image/jpeg' --data-binary @photo.jpg localhost:8000/v1/predict
    """
    from pipelines.serving.options import ServeOptions
    from pipelines.serving.server import serve_until_interrupted, write_serve_config

    if autoscale is not None and replicas != 1:
        raise typer.BadParameter("give --replicas N or --autoscale MIN:MAX, not both", param_hint="--autoscale")
    limits = {"max_pixels": max_pixels} if max_pixels is not None else {}
    options = ServeOptions(model_path, tracking_uri=tracking_uri, overrides=tuple(set_ or ()), config_path=config,
                           use_gpu=bool(gpu), replicas=replicas, autoscale=ServeOptions.parse_autoscale(autoscale),
                           cpus_per_replica=cpus_per_replica, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                           host=host, port=port, **limits)
    if write_config:
        options.spec()  # a bad source or setting is refused now, not at deploy time
        typer.echo(f"serve config: {write_serve_config(options, write_config)}  (deploy: serve deploy {write_config})")
        return
    console("serve", verbose)
    serve_until_interrupted(options, run_context(address, tracking_uri, gpu=gpu),
                            lambda url: typer.echo(f"serving {model_path} at {url}  (Ctrl-C stops)"))


def export_command(
    model_path: Annotated[str, typer.Option(help="Checkpoint directory, MLflow model URI (runs:/ID/model) or "
                                                 "torchvision:FILE (COCO's 80 categories).")],
    out: Annotated[str, typer.Option("--out", help="The ONNX file to write (complete or absent).")],
    batch: Annotated[int, typer.Option(help="Images per run of the graph, fixed in it (fewer are padded).")] = 1,
    opset: Annotated[int, typer.Option(help="ONNX opset, at least 16.")] = 17,
    config: ModelConfigOpt = None,
    set_: ModelSetOpt = None,
    tracking_uri: TrackingOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Export a model as one ONNX graph, uint8 canvas in, detections and mask probabilities out.

    Example: mrcnn-cli export --model-path runs:/RUN_ID/model --out model.onnx --batch 2
    """
    from pipelines.evaluation.onnx_export import export_model

    size = export_model(model_path, out, batch=batch, opset=opset, tracking_uri=tracking_uri,
                        overrides=tuple(set_ or ()), config_path=config)
    typer.echo(f"{out} ({size / 1e6:.1f} MB, batch {batch}, opset {opset})")


COMMANDS = {"predict": predict_command, "serve": serve_command, "export": export_command}

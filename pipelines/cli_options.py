"""What every command of `cli.py` shares: its options, declared once, the run context built from them, the
console set-up, and the one error-to-message mapping.

Every command of the app (`App`) is a `MappedCommand`: an error the user caused (`user_error`: an `InputError` of
pipelines/, mrcnn's ConfigError, WeightsFormatError and BackboneWeightsError, a missing path) ends in a short
message naming the option it is about where there is one, with exit status 2 and no traceback unless --verbose; any
other exception is the project's own bug and keeps its traceback. Light to import (`mrcnn-cli --help`): torch, Ray,
MLflow and pyarrow are imported inside the functions that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
import typer.core

from pipelines.infra.logs import get_logger, setup_logging

log = get_logger("cli")


def user_error(exc: BaseException, command: typer.core.TyperCommand) -> str | None:
    """The one error-to-message mapping of every command: the lines the console shows for an error the user caused (an
    `InputError`, which every typed input error of pipelines/ subclasses; mrcnn's ConfigError, WeightsFormatError
    and BackboneWeightsError; a missing path), naming the option it is about where `command` has it; None for any
    other exception (a bug: its traceback stays). A stage's error raised in a Ray task (`run`) is its cause's."""
    from mrcnn.backbone import BackboneWeightsError
    from mrcnn.config import ConfigError
    from mrcnn.torchvision_weights import WeightsFormatError
    from pipelines.data.errors import InputError
    from pipelines.models import ModelMismatchError
    from pipelines.training.checkpoints import CheckpointError

    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
    exc = cause if isinstance(cause, BaseException) else exc
    if not isinstance(exc, InputError | ConfigError | WeightsFormatError | BackboneWeightsError | FileNotFoundError):
        return None
    about = ((ConfigError, ("config", "set_")), (BackboneWeightsError, ("backbone_weights",)),
             (WeightsFormatError | ModelMismatchError | CheckpointError, ("init", "model_path")))
    names = next((names for kind, names in about if isinstance(exc, kind)), ())
    hint = "/".join(p.opts[0] for p in command.params if p.name in names and p.opts)
    message = str(exc) if " " in str(exc) else f"not found: {exc}"  # a bare path (FileNotFoundError(path))
    verbose = any(p.name == "verbose" for p in command.params)
    return (f"Error: {hint + ': ' if hint else ''}{message}"
            + ("\n(--verbose shows the traceback)" if verbose else ""))


class MappedCommand(typer.core.TyperCommand):
    """A command whose errors go through `user_error`: a user's error ends in its lines on stderr (not wrapped,
    so that a long path stays whole) and exit status 2."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            lines = None if ctx.params.get("verbose") else user_error(exc, self)
            if lines is None:
                raise
            typer.echo(lines, err=True)
            raise typer.Exit(2) from None


class App(typer.Typer):
    """The app: every command is a `MappedCommand` (one error mapping, no command left out)."""

    def command(self, name: str | None = None, **kwargs):
        return super().command(name, cls=kwargs.pop("cls", MappedCommand), **kwargs)



VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", help="Show the traceback of an error, and Ray's and the libraries' own messages and warnings on the "
                      "console too (else only in the log file).")]
ConfigOpt = Annotated[str, typer.Option("--config", help="Preset (coco, shapes, torchvision) or a YAML file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override, repeatable: section.field=value.")]
# --config / --set of the commands that load a model (predict, evaluate, serve, export): pipelines.models.model_spec
ModelConfigOpt = Annotated[str | None, typer.Option(
    "--config", help="For a source without a config of its own (torchvision:FILE): a preset or YAML file; only the "
                     "inference settings and the image size may differ from the source's.")]
ModelSetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Inference setting, repeatable: section.field=value (detection.*, rpn.pre_nms_topk / nms_threshold "
                  "/ post_nms_test, evaluate.*; image.min_dim / max_dim for torchvision:FILE). A setting that "
                  "contradicts the model (its backbone, anchors, heads) is refused.")]
RegisterOpt = Annotated[str | None, typer.Option(
    help="Register the final MLflow model in the Model Registry under this name, alias champion (serve it with "
         "--model-path models:/NAME@champion).")]
AddressOpt = Annotated[
    str | None, typer.Option("--address", envvar="RAY_ADDRESS", help="Ray cluster address; default: a local Ray.")
]
TrackingOpt = Annotated[str | None, typer.Option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking store; default: ./mlflow.db.")]
ExperimentOpt = Annotated[str, typer.Option(help="MLflow experiment.")]
WorkersOpt = Annotated[int, typer.Option(help="Workers: train's data-parallel workers (one GPU each with --gpu), "
                                              "evaluate's inference actors (one model each).")]
GpuOpt = Annotated[bool | None, typer.Option("--gpu/--no-gpu", help="Default: GPUs when there are any.")]
PlacementOpt = Annotated[
    str,
    typer.Option(help="Placement of the train workers: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (one per node)."),
]
CpusOpt = Annotated[float | None, typer.Option(
    help="CPUs reserved per train worker (default: 2 with GPUs, 1 without).")]
SearchOpt = Annotated[list[str], typer.Option(
    "--search", help="Searched setting, repeatable: section.field=kind(args), kind choice | grid | uniform | "
                     "loguniform | randint, e.g. 'train.lr=loguniform(1e-4,1e-2)'.")]
# pipelines.training.tune.SCHEDULERS and METRICS (tests/cli checks): Literal here for a fast --help
TuneScheduler = Literal["asha", "fifo"]
TuneMetric = Literal["val_loss", "segm_AP"]
SchedulerOpt = Annotated[TuneScheduler, typer.Option(
    help="asha (stops poor trials at each rung) | fifo (every trial to the end).")]
MetricOpt = Annotated[TuneMetric, typer.Option(
    help="The metric trials are compared by, each epoch: val_loss (lower is better) | segm_AP (higher; COCO segm AP "
         "of the first train.val_ap_images validation images by id, 100 when unset).")]
DEFAULT_EXPERIMENT = "mrcnn-pipeline"  # pipelines.infra.tracking.DEFAULT_EXPERIMENT (tests/cli checks)


def run_context(address: str | None = None, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                workers: int = 1, gpu: bool | None = None, storage: str | None = None):
    """The command's one run context, from the shared options."""
    from pipelines.infra.context import RunContext

    return RunContext(address=address, tracking_uri=tracking_uri, experiment=experiment, workers=workers,
                      use_gpu=gpu, storage=storage)


def console(command: str, verbose: bool, folder: str | Path | None = None) -> Path:
    """The console keeps the project's lines; Ray's and the libraries' messages and warnings go to a log file
    (also shown with --verbose): `<folder>/logs/` for a local output folder, else the temporary folder."""
    import tempfile
    import time

    from pipelines.infra.storage import is_uri

    local = folder is not None and not is_uri(str(folder))
    where = Path(folder) / "logs" if local else Path(tempfile.gettempdir()) / "mrcnn-cli"
    path = (where / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log").resolve()
    setup_logging(log_file=path, verbose=verbose)
    log.info("Ray's and the libraries' messages: %s%s", path, "" if verbose else " (--verbose shows them here)")
    return path


def placement(strategy: str) -> str:
    from pipelines.training.train import PLACEMENT_STRATEGIES

    if strategy.upper() not in PLACEMENT_STRATEGIES:
        raise typer.BadParameter(f"{strategy!r}: one of {', '.join(PLACEMENT_STRATEGIES)}",
                                 param_hint="--placement-strategy")
    return strategy.upper()


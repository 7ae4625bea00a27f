"""Where a model's weights come from: one parser (`ModelSource.parse`) and one loader (`load_source`), used by
`train --init` (in each worker) and by evaluate, predict and inspect (through `pipelines.models`).

    PATH or URI                 a checkpoint folder (meta.json + state.pt, pipelines/training/checkpoints.py)
    runs:/RUN_ID/PATH           an MLflow model of a run,
    models:/NAME/VERSION        of the registry (or models:/NAME@ALIAS),
    mlflow-artifacts:/PATH      of an artifact store
    torchvision:FILE            torchvision's weights (pipelines/training/pretrained.py), FILE a path or a URI

Weights files (a torchvision file, `--backbone-weights`) are read whole through `pipelines.infra.storage` (a local
path or `s3://`, `gs://`, `file://`) and unpickled as data only (`pipelines.training.pretrained.read_state_file`).
A source that is not a model raises `ModelSourceError` naming it and the forms a model source takes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from torch import nn

from mrcnn.config import Config
from pipelines.data.categories import CategoryMap
from pipelines.data.errors import InputError
from pipelines.infra import tracking
from pipelines.infra.storage import absolute
from pipelines.training.checkpoints import CheckpointError, load_checkpoint, load_model_state, read_meta
from pipelines.training.pretrained import (
    TORCHVISION_PREFIX,
    initialise_from_torchvision,
    load_backbone_file,
    load_torchvision_file,
)

MLFLOW_MODEL_SCHEMES = ("runs", "models", "mlflow-artifacts")
FORMS = ("a model is a checkpoint folder (meta.json and state.pt; a path or a URI), runs:/RUN_ID/PATH, "
         "models:/NAME/VERSION, models:/NAME@ALIAS, mlflow-artifacts:/PATH or torchvision:FILE")


class ModelSourceError(CheckpointError):
    """A model source that is not a model (neither a checkpoint, an MLflow model nor a torchvision file), or not
    written as one; the message names it and the forms a model source takes."""


class ModelMismatchError(InputError):
    """A model whose category map or geometry does not fit the shards it is asked to evaluate."""


@dataclass(frozen=True)
class ModelSource:
    """A parsed model source. location: the checkpoint folder or the torchvision FILE (local paths made absolute:
    Ray workers do not share the driver's working directory) or the MLflow model URI."""

    kind: Literal["checkpoint", "mlflow", "torchvision"]
    location: str

    @classmethod
    def parse(cls, text: str | os.PathLike) -> ModelSource:
        text = os.fspath(text)
        if text.startswith(TORCHVISION_PREFIX):
            file = text[len(TORCHVISION_PREFIX):]
            if not file:
                raise ModelSourceError(f"{text!r} names no file; {FORMS}")
            return cls("torchvision", absolute(file))
        scheme, sep, rest = text.partition(":")
        if sep and scheme.lower() in MLFLOW_MODEL_SCHEMES:
            if not rest.strip("/"):
                raise ModelSourceError(f"{text!r} names no model; {FORMS}")
            return cls("mlflow", text)
        if not text:
            raise ModelSourceError(f"an empty model source; {FORMS}")
        return cls("checkpoint", absolute(text))

    def __str__(self) -> str:
        """As written on the command line (`torchvision:FILE` with its prefix)."""
        return TORCHVISION_PREFIX + self.location if self.kind == "torchvision" else self.location


def load_source(model: nn.Module, source: ModelSource, *, categories: CategoryMap, config: Config,
                fine_tune: bool, tracking_uri: str | None = None) -> list[str]:
    """Load the weights of `source` into `model` (built with `config` for `categories`); returns the lines that say
    what was loaded.

    fine_tune (`train --init`): tensors of a model of another class count keep their fresh initialisation, and a
    torchvision ImageNet ResNet loads the backbone only; else (evaluate, predict, inspect) every tensor must fit
    (CheckpointError), and a torchvision file must be a Mask R-CNN of these classes (ModelMismatchError).
    tracking_uri: where `runs:/` and `models:/` resolve (set for this process: a Ray actor does not inherit the
    driver's MLflow state)."""
    if source.kind == "torchvision":
        if fine_tune:
            return initialise_from_torchvision(model, source.location, categories, config)
        report = load_torchvision_file(model, source.location, categories)
        if report.format != "maskrcnn" or report.reinitialised:
            raise ModelMismatchError(
                f"{source.location} is not a model of these classes: an ImageNet ResNet has no detection heads, a "
                "Mask R-CNN of another class count no class layers for them; start training from it with train "
                f"--init ({report.summary()})"
            )
        return [f"loaded {source} (torchvision's Mask R-CNN): {report.summary()}"]
    said = "initialised from" if fine_tune else "loaded"
    if source.kind == "checkpoint":
        state = load_checkpoint(source.location)
        weights, loaded = state.model, f"{said} {source} (step {state.step})"
    else:
        weights, loaded = load_mlflow_model(source.location, tracking_uri).state_dict(), f"{said} {source}"
    reinit = load_model_state(model, weights, reinit_class_layers=fine_tune)
    if reinit:
        return [loaded, f"different number of classes: re-initialised the class-specific layers {', '.join(reinit)}"]
    return [loaded]


def load_mlflow_model(uri: str, tracking_uri: str | None):
    """The pickled PyTorch model of an MLflow model URI; runs:/ and models:/ resolve in `tracking_uri` (set for this
    process: a Ray actor does not inherit the driver's MLflow state)."""
    import mlflow.pytorch

    with tracking.fluent_store(tracking_uri):
        return mlflow.pytorch.load_model(uri, map_location="cpu")


def check_init(source: ModelSource | None, *, config: Config, categories: CategoryMap, num_classes: int,
               backbone_weights: str | None = None) -> None:
    """`train --init` and `--backbone-weights`, checked on the driver before any worker starts (else each worker
    would fail alone, in a Ray traceback): a torchvision file and the backbone weights are loaded into a model of
    `config` (WeightsFormatError / BackboneWeightsError naming the file when it is not weights that fit), a
    checkpoint's meta.json read (ModelSourceError naming the location when it is not a checkpoint)."""
    from mrcnn.model import build_model

    if backbone_weights:
        load_backbone_file(build_model(config, num_classes=num_classes), backbone_weights)
    if source is None:
        return
    if source.kind == "torchvision":
        load_torchvision_file(build_model(config, num_classes=num_classes), source.location, categories)
    elif source.kind == "checkpoint":
        try:
            read_meta(source.location)
        except CheckpointError as exc:
            raise ModelSourceError(f"{exc}; {FORMS}") from exc

"""A trained model from wherever it lives: a checkpoint folder (local or URI), an MLflow model URI, or
`torchvision:FILE` (torchvision's Mask R-CNN v1 state dict, pipelines/training/pretrained.py).

`model_spec(path)` reads what the model is (config, categories) without loading weights; `load_model(spec)`
builds and loads it in eval mode; `check_model_fits(spec, manifest)` refuses shards of another geometry or
another category set. Used by evaluate, predict and inspect.

A torchvision file carries neither config nor categories: its config is the `torchvision` preset, its categories
those of the shards it is evaluated on (`model_spec(path, categories=manifest["categories"])`, which must be COCO's,
all or some of them), else COCO's 80 (torchvision's own names, from its weights' meta).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from mrcnn.config import Config, fingerprint_diff
from mrcnn.model import build_model
from pipelines.data.categories import CategoryMap
from pipelines.data.errors import InputError
from pipelines.infra import tracking
from pipelines.infra.storage import exists, filesystem_for
from pipelines.training.checkpoints import CheckpointError, load_checkpoint, load_model_state, read_meta
from pipelines.training.pretrained import (
    absolute_model_path,
    class_rows,
    coco_categories,
    is_torchvision_path,
    load_torchvision_file,
    torchvision_config,
)


class ModelMismatchError(InputError):
    """A model whose category map or geometry does not fit the shards it is asked to evaluate."""


@dataclass
class ModelSpec:
    """What evaluation needs to know of a model: its config, categories and how to get its weights."""

    config: Config
    categories: dict[str, Any]
    num_classes: int
    checkpoint: str | None = None
    mlflow_uri: str | None = None
    torchvision: str | None = None  # `torchvision:FILE`
    # where `mlflow_uri` resolves (runs:/, models:/): the tracking store, carried to the Ray actors that load it
    tracking_uri: str | None = None

    @property
    def location(self) -> str | None:
        """Where the weights come from, as given."""
        return self.checkpoint or self.mlflow_uri or self.torchvision


MLFLOW_MODEL_SCHEMES = ("runs", "models", "mlflow-artifacts")


def is_mlflow_model_uri(model_path: str) -> bool:
    """`runs:/ID/model`, `models:/NAME/VERSION`, `mlflow-artifacts:/...`: an MLflow model. Anything else (a path,
    `file:///...`, `s3://...`) is a checkpoint directory."""
    scheme, sep, _ = model_path.partition(":")
    return bool(sep) and scheme.lower() in MLFLOW_MODEL_SCHEMES


def model_spec(model_path: str, *, categories: dict[str, Any] | None = None,
               tracking_uri: str | None = None) -> ModelSpec:
    """Read a checkpoint's meta.json (local path or URI), or an MLflow model's carried meta, without building
    the model. A location without meta.json but with an MLmodel file (an MLflow model saved to a path or an
    artifact store URI) is an MLflow model too. `tracking_uri`: the store MLflow model URIs resolve in (default:
    `pipelines.infra.tracking.resolve_tracking_uri()`, as the stages log to).

    categories: for `torchvision:FILE` only (other models carry theirs), the category map (`CategoryMap.to_dict()`
    form, e.g. a manifest's "categories") its COCO-indexed classes are mapped to; default COCO's 80."""

    if is_torchvision_path(model_path):
        wanted = CategoryMap.from_dict(categories) if categories is not None else coco_categories()
        if class_rows(wanted) is None:
            raise ModelMismatchError(
                f"{model_path} predicts COCO's categories, and these are not COCO's (ids and names): "
                f"{', '.join(f'{c} {n!r}' for c, n in zip(wanted.coco_ids[:5], wanted.names[:5], strict=True))}"
            )
        # made absolute: evaluate loads it in Ray actors, which do not share this working directory
        return ModelSpec(torchvision_config(), wanted.to_dict(), wanted.num_classes,
                         torchvision=absolute_model_path(model_path))
    if not is_mlflow_model_uri(model_path):
        try:
            meta = read_meta(model_path)
        except CheckpointError:
            if not _has_mlmodel(model_path):
                raise
        else:
            config = Config.from_dict(meta["config"])
            return ModelSpec(config, meta["categories"], int(meta["num_classes"]), checkpoint=model_path)
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    model = _load_mlflow_model(model_path, tracking_uri)
    meta = model.mrcnn_meta  # set by pipelines/training/train.py when it logs the model
    config = Config.from_dict(meta["config"])
    return ModelSpec(config, meta["categories"], meta["num_classes"], mlflow_uri=model_path, tracking_uri=tracking_uri)


def load_model(spec: ModelSpec, *, device: torch.device | str = "cpu", min_confidence: float | None = None):
    """The model in eval mode on `device`; weights from the checkpoint (weights_only) or the MLflow model."""

    config = spec.config
    if min_confidence is not None:
        config = replace(config, detection=replace(config.detection, min_confidence=min_confidence))
    model = build_model(config, num_classes=spec.num_classes)
    if spec.torchvision:
        report = load_torchvision_file(model, spec.torchvision, CategoryMap.from_dict(spec.categories))
        if report.format != "maskrcnn" or report.reinitialised:
            raise ModelMismatchError(
                f"{spec.torchvision} is not a model of these classes: an ImageNet ResNet has no detection heads, a "
                "Mask R-CNN of another class count no class layers for them; start training from it with train "
                f"--init ({report.summary()})"
            )
    elif spec.checkpoint:
        load_model_state(model, load_checkpoint(spec.checkpoint).model)
    else:
        load_model_state(model, _load_mlflow_model(spec.mlflow_uri, spec.tracking_uri).state_dict())
    return model.to(device).eval()


def check_model_fits(spec: ModelSpec, manifest: dict[str, Any]) -> None:
    """Refuse a model trained with another category map or another geometry than the shards."""
    ours, theirs = CategoryMap.from_dict(spec.categories), CategoryMap.from_dict(manifest["categories"])
    if ours.coco_ids != theirs.coco_ids:
        raise ModelMismatchError(
            f"the model's categories (COCO ids {list(ours.coco_ids)}) differ from the shards' "
            f"(COCO ids {list(theirs.coco_ids)})"
        )
    diff = fingerprint_diff(manifest["shard_fields"], spec.config.shard_fields())
    if diff:
        raise ModelMismatchError("the model's geometry differs from the shards': " + "; ".join(diff))


def _has_mlmodel(location: str) -> bool:
    try:
        filesystem, root = filesystem_for(location)
        return exists(filesystem, f"{root.rstrip('/')}/MLmodel")
    except (OSError, ValueError, NotImplementedError):
        return False


def _load_mlflow_model(uri: str, tracking_uri: str | None):
    """The pickled PyTorch model of an MLflow model URI; runs:/ and models:/ resolve in `tracking_uri` (set for this
    process: a Ray actor does not inherit the driver's MLflow state)."""
    import mlflow.pytorch

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pytorch.load_model(uri, map_location="cpu")

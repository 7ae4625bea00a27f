"""A trained model from wherever it lives (a `pipelines.training.model_source.ModelSource`: a checkpoint folder, local
or a URI, an MLflow model URI, or `torchvision:FILE`, torchvision's Mask R-CNN v1 state dict).

`model_spec(path)` reads what the model is (config, categories) without loading weights; `load_model(spec)`
builds and loads it in eval mode (`load_source`, the loader `train --init` uses too); `check_model_fits(spec,
manifest)` refuses shards of another geometry or another category set. Used by evaluate, predict and inspect.

`--set` / `--config` of the commands that load a model (predict, evaluate, inspect, serve, export) go through
`model_spec(path, overrides=..., config_path=...)` (`inference_config`): only the settings that apply at inference
may change (INFERENCE_SETTINGS: detection thresholds, NMS, RPN's test-time counts, evaluation's threshold and batch);
the image size too for a source without a config of its own (`torchvision:FILE`, whose `--config` may be a file or
preset). A setting that would contradict the model (its backbone, anchors, heads: its architecture and training) is
refused (ConfigError naming the key, both values and why).

A torchvision file carries neither config nor categories: its config is the `torchvision` preset, its categories
those of the shards it is evaluated on (`model_spec(path, categories=manifest["categories"])`, which must be COCO's,
all or some of them), else COCO's 80 (torchvision's own names, from its weights' meta).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from mrcnn.config import Config, ConfigError, fingerprint_diff, load_config
from mrcnn.model import build_model
from pipelines.data.categories import CategoryMap
from pipelines.infra import tracking
from pipelines.infra.storage import exists, filesystem_for
from pipelines.training.checkpoints import CheckpointError, read_meta
from pipelines.training.model_source import (
    FORMS,
    ModelMismatchError,
    ModelSource,
    ModelSourceError,
    load_mlflow_model,
    load_source,
)
from pipelines.training.pretrained import class_rows, coco_categories, torchvision_config


@dataclass(frozen=True)
class ModelSpec:
    """What evaluation needs to know of a model: its config, categories and where its weights come from."""

    config: Config
    categories: dict[str, Any]
    num_classes: int
    source: ModelSource
    # where an MLflow source resolves (runs:/, models:/): the tracking store, carried to the Ray actors that load it
    tracking_uri: str | None = None

    @property
    def location(self) -> str:
        """Where the weights come from, as written (`torchvision:FILE` with its prefix)."""
        return str(self.source)


# the settings a model's own config may change at inference; IMAGE_SIZE too where the source has no config of its own
INFERENCE_SETTINGS = ("detection.min_confidence", "detection.nms_threshold", "detection.max_detections",
                      "detection.min_size", "rpn.pre_nms_topk", "rpn.nms_threshold", "rpn.post_nms_test",
                      "evaluate.min_confidence", "evaluate.batch_size")
IMAGE_SIZE = ("image.min_dim", "image.max_dim")
TRAINING_ONLY = ("name", "train.", "preprocess.")  # settings a loaded model never reads: free to differ


def inference_config(config: Config, *, overrides: list[str] | tuple[str, ...] = (), config_path: str | None = None,
                     own_config: bool = True, source: str = "the model") -> Config:
    """`config` (the model's) with `--config` / `--set` applied, refusing any change but INFERENCE_SETTINGS (and
    IMAGE_SIZE where `own_config` is False): ConfigError naming each such key, its two values and why."""
    if config_path is not None and own_config:
        raise ConfigError(f"--config {config_path}: {source} carries its own config; change its inference settings "
                          f"with --set ({', '.join(INFERENCE_SETTINGS)})")
    changed = load_config(config_path) if config_path is not None else config
    changed = changed.override(list(overrides)) if overrides else changed
    allowed = INFERENCE_SETTINGS + (() if own_config else IMAGE_SIZE)
    before, after = config.flat(), changed.flat()
    wrong = [f"{key}={after[key]!r} (the model's: {before[key]!r})" for key in after
             if after[key] != before.get(key) and key not in allowed and not key.startswith(TRAINING_ONLY)]
    if wrong:
        raise ConfigError(f"{'; '.join(wrong)}: would contradict {source}, whose weights were made for its own "
                          f"value; only the inference settings may change: {', '.join(allowed)}")
    return changed


def model_spec(model_path: str, *, categories: dict[str, Any] | None = None, tracking_uri: str | None = None,
               overrides: list[str] | tuple[str, ...] = (), config_path: str | None = None) -> ModelSpec:
    """Read a checkpoint's meta.json (local path or URI), or an MLflow model's carried meta, without building
    the model. A location without meta.json but with an MLmodel file (an MLflow model saved to a path or an
    artifact store URI) is an MLflow model too; one with neither is not a model (ModelSourceError, naming it).
    `tracking_uri`: the store MLflow model URIs resolve in (default:
    `pipelines.infra.tracking.resolve_tracking_uri()`, as the stages log to).

    categories: for `torchvision:FILE` only (other models carry theirs), the category map (`CategoryMap.to_dict()`
    form, e.g. a manifest's "categories") its COCO-indexed classes are mapped to; default COCO's 80.
    overrides / config_path: `--set` / `--config` of the command (`inference_config`)."""

    spec = _read_spec(model_path, categories=categories, tracking_uri=tracking_uri)
    if not overrides and config_path is None:
        return spec
    config = inference_config(spec.config, overrides=overrides, config_path=config_path,
                              own_config=spec.source.kind != "torchvision", source=model_path)
    return replace(spec, config=config)


def _read_spec(model_path: str, *, categories: dict[str, Any] | None, tracking_uri: str | None) -> ModelSpec:
    source = ModelSource.parse(model_path)
    if source.kind == "torchvision":
        wanted = CategoryMap.from_dict(categories) if categories is not None else coco_categories()
        if class_rows(wanted) is None:
            raise ModelMismatchError(
                f"{model_path} predicts COCO's categories, and these are not COCO's (ids and names): "
                f"{', '.join(f'{c} {n!r}' for c, n in zip(wanted.coco_ids[:5], wanted.names[:5], strict=True))}"
            )
        return ModelSpec(torchvision_config(), wanted.to_dict(), wanted.num_classes, source)
    if source.kind == "checkpoint":
        try:
            meta = read_meta(source.location)
        except CheckpointError as exc:
            if not _has_mlmodel(source.location):
                raise ModelSourceError(f"{model_path}: not a checkpoint (no meta.json) nor an MLflow model (no "
                                       f"MLmodel); {FORMS}") from exc
            source = ModelSource("mlflow", source.location)
        else:
            config = Config.from_dict(meta["config"])
            return ModelSpec(config, meta["categories"], int(meta["num_classes"]), source)
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    model = load_mlflow_model(source.location, tracking_uri)
    meta = getattr(model, "mrcnn_meta", None)  # set by pipelines/training/train.py when it logs the model
    if meta is None:
        raise ModelSourceError(f"{model_path}: an MLflow model, but not one of ours (no mrcnn_meta); {FORMS}")
    config = Config.from_dict(meta["config"])
    return ModelSpec(config, meta["categories"], meta["num_classes"], source, tracking_uri=tracking_uri)


def load_model(spec: ModelSpec, *, device: torch.device | str = "cpu", min_confidence: float | None = None):
    """The model in eval mode on `device`, every tensor from the source (read as data where we read it: checkpoints
    and torchvision files with weights_only; MLflow unpickles its own models)."""

    config = spec.config
    if min_confidence is not None:
        config = replace(config, detection=replace(config.detection, min_confidence=min_confidence))
    model = build_model(config, num_classes=spec.num_classes)
    load_source(model, spec.source, categories=CategoryMap.from_dict(spec.categories), config=config,
                fine_tune=False, tracking_uri=spec.tracking_uri)
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

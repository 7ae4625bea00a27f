"""`torchvision:FILE`: torchvision's weights as where training starts (`train --init`) or as the model itself
(`evaluate`, `predict`, `inspect --model-path`).

FILE, a local path or a URI, holds a state dict saved by torchvision, read as data (`weights_only`): its Mask R-CNN v1
(`maskrcnn_resnet50_fpn`, e.g. the COCO file `maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth`, or
`model.state_dict()` of one), or an ImageNet ResNet (`resnet50-0676ba61.pth`, ...: the backbone only). The tensors are
converted by `mrcnn.torchvision_weights`. The class layers, 91 rows indexed by COCO category id, reach our contiguous
classes through the category map: categories that are COCO's (ids and names, `coco_class_rows`) take torchvision's
rows for their ids; any other set re-initialises the class-specific layers. A torchvision file carries no config: its
model is the `torchvision` preset's (`mrcnn.config.torchvision_maskrcnn`), whose conventions give torchvision's outputs.

`train --backbone-weights FILE` (a local path or a URI) takes a torchvision ResNet state dict too
(`load_backbone_file`). Every weights file is read by `read_state_file`: whole, through `pipelines.infra.storage`,
unpickled as data only. `mrcnn/` takes the state dicts.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from mrcnn.backbone import BackboneWeightsError, load_backbone_weights
from mrcnn.config import Config, torchvision_maskrcnn
from mrcnn.torchvision_weights import (
    LoadReport,
    WeightsFormatError,
    coco_category_names,
    coco_class_rows,
    load_torchvision_state,
    unwrap_state,
)
from pipelines.data.categories import CategoryMap
from pipelines.infra.storage import read_bytes

TORCHVISION_PREFIX = "torchvision:"

# settings of the torchvision preset that its weights were trained with (a config differing in any of them still loads
# the weights, as a starting point, and is told so)
CONVENTIONS = (
    "backbone.depth", "backbone.fpn_channels", "backbone.frozen_bn_eps", "rpn.anchor_scales", "rpn.feature_strides",
    "rpn.anchor_ratios", "rpn.anchor_stride", "rpn.anchor_offset", "rpn.round_anchors", "rpn.bbox_std",
    "rpn.pre_nms_per_level", "rpn.nms_per_level", "roi.aligned", "roi.pool_size", "roi.mask_pool_size", "roi.fc_dim",
    "roi.mask_conv_dim", "roi.mask_conv_layers", "roi.bbox_std", "image.pixel_mean", "image.pixel_std",
)


def torchvision_config() -> Config:
    """The config of a torchvision file's model: the `torchvision` preset."""
    return torchvision_maskrcnn()


def coco_categories() -> CategoryMap:
    """COCO's 80 categories (ids 1..90 with gaps, torchvision's names): what a torchvision COCO model predicts."""
    names = coco_category_names()
    ids = [i for i, name in enumerate(names) if name not in ("__background__", "N/A")]
    return CategoryMap(tuple(ids), tuple(names[i] for i in ids))


def class_rows(categories: CategoryMap) -> list[int] | None:
    """torchvision's class row of each of our classes ([0, *coco_ids]) when the categories are COCO's, else None."""
    return coco_class_rows(categories.coco_ids, categories.names)


def read_state_file(location: str, *, what: str, error: type[Exception]) -> Any:
    """The tensors saved in the file `location` (a local path or a URI), read whole through storage (one request on
    an object store) and unpickled as data only (`weights_only`): a weights file is data, never code.
    `error(message naming the file)` when it is missing, unreadable or not a state dict that loads safely; `what`
    says what the file was to hold."""
    try:
        data = read_bytes(location)
    except FileNotFoundError as exc:
        raise error(f"{what} file not found: {location}") from exc
    except (OSError, ValueError) as exc:  # a folder, no such bucket, no credentials, a bad URI
        raise error(f"cannot read {what} from {location}: {exc}") from exc
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure: not a (safe) weights file
        raise error(f"cannot read {what} from {location}: not a state dict that loads safely (weights_only): "
                    f"{exc}") from exc


def load_backbone_file(model: nn.Module, location: str) -> None:
    """`--backbone-weights`: a torchvision ResNet state dict (a local path or a URI) into the model's backbone;
    BackboneWeightsError naming the file when it cannot be read or does not fit."""
    state = read_state_file(location, what="backbone weights", error=BackboneWeightsError)
    load_backbone_weights(model, state, source=location)


def read_torchvision_state(file: str) -> dict[str, torch.Tensor]:
    """The tensors of a torchvision weights file (a local path or a URI), unwrapped from a checkpoint-like dict."""
    state = read_state_file(file, what="torchvision weights", error=WeightsFormatError)
    try:
        return unwrap_state(state)
    except WeightsFormatError as exc:
        raise WeightsFormatError(f"{file}: {exc}") from exc


def load_torchvision_file(model: nn.Module, file: str, categories: CategoryMap) -> LoadReport:
    """Load a torchvision weights file into our MaskRCNN, its class layers through `categories` (see the module
    docstring). WeightsFormatError naming the file and the keys when it fits neither torchvision format nor this
    model."""
    state = read_torchvision_state(file)
    try:
        return load_torchvision_state(model, state, class_rows=class_rows(categories))
    except WeightsFormatError as exc:
        raise WeightsFormatError(f"{file}: {exc}") from exc


def initialise_from_torchvision(model: nn.Module, file: str, categories: CategoryMap, config: Config) -> list[str]:
    """`train --init torchvision:FILE`: load it, and the lines that say what was loaded, re-initialised and skipped."""
    report = load_torchvision_file(model, file, categories)
    kind = "Mask R-CNN" if report.format == "maskrcnn" else "ImageNet ResNet (backbone only)"
    messages = [f"initialised from {TORCHVISION_PREFIX}{file} (torchvision's {kind}): {report.summary()}"]
    if report.format == "maskrcnn":
        if class_rows(categories) is not None:
            messages.append(f"classes: the shards' {len(categories.coco_ids)} COCO categories take torchvision's "
                            "class rows of their COCO ids")
        else:
            messages.append("classes: the shards' categories are not COCO's (ids and names): the class-specific "
                            "layers are re-initialised")
    differing = convention_diff(config)
    if differing:
        messages.append("this config differs from the torchvision preset the weights were trained with in "
                        f"{', '.join(differing)}: they are a starting point, not torchvision's model")
    return messages


def convention_diff(config: Config) -> list[str]:
    """The `CONVENTIONS` in which `config` differs from the torchvision preset, as "key: ours (torchvision's)"."""
    ours, theirs = config.flat(), torchvision_config().flat()
    return [f"{key}: {ours[key]} ({theirs[key]})" for key in CONVENTIONS if ours[key] != theirs[key]]


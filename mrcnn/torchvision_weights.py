"""torchvision's weights in our model: its Mask R-CNN v1 (`maskrcnn_resnet50_fpn`) and its ImageNet ResNets.

A state dict is recognised by its keys (`weights_format`) and renamed to ours (`convert_state`);
`load_torchvision_state` loads it and says what it did (`LoadReport`). The same weights give the same outputs only at
the `torchvision` preset (`mrcnn.config.torchvision_maskrcnn`: anchors, box coder, proposal layer, RoIAlign, detection
layer, FrozenBatchNorm eps; docs/design.md, "Model"); tests/mrcnn/test_torchvision_weights.py proves it.

Mask R-CNN keys, torchvision -> ours (both namings torchvision has used: the COCO v1 file, saved in 2019, has the older
one, e.g. `rpn.head.conv.weight` and `roi_heads.mask_head.mask_fcn1.weight`):

    backbone.body.*                                   backbone.*  (conv1, bn1, layer1..4)
    backbone.fpn.inner_blocks.i[.0].*                 fpn.lateral.i.*
    backbone.fpn.layer_blocks.i[.0].*                 fpn.output.i.*
    rpn.head.conv[.0.0].*                             rpn_head.conv.*
    rpn.head.cls_logits.*, rpn.head.bbox_pred.*       rpn_head.objectness.*, rpn_head.deltas.*
    roi_heads.box_head.fc6.*, fc7.*                   box_head.fc1.*, box_head.fc2.*
    roi_heads.box_predictor.cls_score.*               box_head.class_logits.*     (class-specific)
    roi_heads.box_predictor.bbox_pred.*               box_head.box_deltas.*       (class-specific, 4 rows a class)
    roi_heads.mask_head.i.0.* (mask_fcn<i+1>.*)       mask_head.convs.<2i>.*
    roi_heads.mask_predictor.conv5_mask.*             mask_head.upsample.*
    roi_heads.mask_predictor.mask_fcn_logits.*        mask_head.predictor.*       (class-specific)

The RPN head's channels need no reordering: the preset lists the anchor ratios in torchvision's order. The class
layers have 91 rows, indexed by COCO category id (0 background, 10 ids unused); `class_rows` picks the row of each of
our classes (`[0, *coco_ids]` maps them to contiguous ids; `range(91)` keeps torchvision's indexing).

ImageNet ResNet keys (`conv1.*`, `bn1.*`, `layer1..4.*`, `fc.*`) go to `backbone.*`; `fc.*` is unused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

TORCHVISION_NUM_CLASSES = 91  # background + COCO ids 1..90
# our tensors whose first dimension counts classes: re-initialised when the class count differs
CLASS_SPECIFIC = (
    "box_head.class_logits.weight", "box_head.class_logits.bias",
    "box_head.box_deltas.weight", "box_head.box_deltas.bias",
    "mask_head.predictor.weight", "mask_head.predictor.bias",
)
_ROWS_PER_CLASS = {"box_head.box_deltas.weight": 4, "box_head.box_deltas.bias": 4}

WeightsFormat = Literal["maskrcnn", "resnet"]


class WeightsFormatError(ValueError):
    """A state dict that fits neither torchvision's Mask R-CNN nor its ResNet, or not this model; names the keys."""


def _mask_conv(match: re.Match) -> str:
    index = int(match.group(1)) if match.group(1) is not None else int(match.group(2)) - 1
    return f"mask_head.convs.{2 * index}.{match.group(3)}"  # Sequential(conv, relu, conv, relu, ...)


_W = r"(weight|bias)"
_MASKRCNN_RENAMES: tuple[tuple[re.Pattern, str | Callable[[re.Match], str]], ...] = tuple(
    (re.compile(pattern + r"$"), replacement)
    for pattern, replacement in (
        (r"backbone\.body\.((?:conv1|bn1|layer[1-4])\..+)", r"backbone.\1"),
        (rf"backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?{_W}", r"fpn.lateral.\1.\2"),
        (rf"backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?{_W}", r"fpn.output.\1.\2"),
        (rf"rpn\.head\.conv\.(?:0\.0\.)?{_W}", r"rpn_head.conv.\1"),
        (rf"rpn\.head\.cls_logits\.{_W}", r"rpn_head.objectness.\1"),
        (rf"rpn\.head\.bbox_pred\.{_W}", r"rpn_head.deltas.\1"),
        (rf"roi_heads\.box_head\.fc6\.{_W}", r"box_head.fc1.\1"),
        (rf"roi_heads\.box_head\.fc7\.{_W}", r"box_head.fc2.\1"),
        (rf"roi_heads\.box_predictor\.cls_score\.{_W}", r"box_head.class_logits.\1"),
        (rf"roi_heads\.box_predictor\.bbox_pred\.{_W}", r"box_head.box_deltas.\1"),
        (rf"roi_heads\.mask_head\.(?:(\d+)\.0|mask_fcn(\d+))\.{_W}", _mask_conv),
        (rf"roi_heads\.mask_predictor\.conv5_mask\.{_W}", r"mask_head.upsample.\1"),
        (rf"roi_heads\.mask_predictor\.mask_fcn_logits\.{_W}", r"mask_head.predictor.\1"),
    )
)
_RESNET_KEY = re.compile(r"(?:conv1|bn1|layer[1-4])\..+$")
_RESNET_CLASSIFIER = re.compile(r"fc\.(weight|bias)$")


@dataclass
class LoadReport:
    """What `load_torchvision_state` did, by our tensor names (the file's names for `skipped`)."""

    format: WeightsFormat
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # class-specific, kept fresh: another class count
    fresh: list[str] = field(default_factory=list)  # not in the file (a ResNet file: everything but the backbone)
    skipped: list[str] = field(default_factory=list)  # in the file, unused (ResNet's fc, num_batches_tracked)

    def summary(self) -> str:
        """e.g. "306 tensors loaded, 6 re-initialised (box_head.class_logits.weight, ...), 53 skipped (...)"."""
        parts = [f"{len(self.loaded)} tensors loaded"]
        if self.reinitialised:
            parts.append(f"{len(self.reinitialised)} re-initialised (class-specific: {', '.join(self.reinitialised)})")
        else:
            parts.append("0 re-initialised")
        if self.fresh:
            parts.append(f"{len(self.fresh)} not in the file (fresh initialisation: {_short(self.fresh)})")
        parts.append(f"{len(self.skipped)} skipped" + (f" (unused: {_short(self.skipped)})" if self.skipped else ""))
        return ", ".join(parts)


def coco_category_names() -> tuple[str, ...]:
    """torchvision's COCO category names by category id: 91 entries, "__background__" at 0 and "N/A" at the 10 ids
    COCO leaves unused (12, 26, 29, 30, 45, 66, 68, 69, 71, 83). From its weights' meta, so nothing is downloaded."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    return tuple(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def coco_class_rows(coco_ids: Sequence[int], names: Sequence[str]) -> list[int] | None:
    """The class rows that map torchvision's COCO-indexed outputs to contiguous classes ([0, *coco_ids]: our class k is
    row coco_ids[k - 1]) when every category is one of COCO's (its id and name, case aside, are torchvision's); None
    for any other category set, whose class layers then have nothing to come from."""
    known = coco_category_names()
    for coco_id, name in zip(coco_ids, names, strict=True):
        if not 0 < int(coco_id) < len(known) or known[int(coco_id)] in ("N/A", "__background__") \
                or known[int(coco_id)].lower() != str(name).strip().lower():
            return None
    return [0, *(int(c) for c in coco_ids)]


def unwrap_state(state: object) -> dict[str, Tensor]:
    """The tensors of a state dict, also inside {"model": ...} (torchvision's reference scripts' checkpoints)."""
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise WeightsFormatError(f"expected a state dict (names -> tensors), got {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def weights_format(state: dict[str, Tensor]) -> WeightsFormat:
    """"maskrcnn" or "resnet" by the keys; WeightsFormatError naming the first keys when it is neither."""
    keys = list(state)
    if any(k.startswith(("backbone.body.", "roi_heads.", "rpn.head.")) for k in keys):
        return "maskrcnn"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
        return "resnet"
    raise WeightsFormatError(
        "fits neither torchvision's Mask R-CNN state dict (backbone.body.*, backbone.fpn.*, rpn.head.*, roi_heads.*) "
        f"nor its ResNet's (conv1.*, bn1.*, layer1..4.*, fc.*): first keys {_short(keys, 5)}"
    )


def convert_state(
    state: dict[str, Tensor], *, class_rows: Sequence[int] | None = None
) -> tuple[WeightsFormat, dict[str, Tensor], list[str]]:
    """(format, our-named tensors, the file's keys that have no counterpart here but are harmless to leave out).

    class_rows: for a Mask R-CNN file, torchvision's class row of each of our classes (ours 0..K-1); None leaves the
    class-specific tensors out (no correspondence: they keep their fresh initialisation). Raises WeightsFormatError
    naming the keys that fit no rule (another architecture, e.g. a v2 or keypoint model).
    """
    fmt = weights_format(state)
    converted: dict[str, Tensor] = {}
    unused, unfit = [], []
    for key, value in state.items():
        name = _rename(key, fmt)
        if name is None:
            (unused if _RESNET_CLASSIFIER.match(key) and fmt == "resnet" else unfit).append(key)
            continue
        if name in CLASS_SPECIFIC:
            if class_rows is None:
                continue
            value = _select_rows(value, name, class_rows, key)
        converted[name] = value
    if unfit:
        raise WeightsFormatError(f"torchvision {fmt} state dict with keys that fit no layer of ours: "
                                 f"{_short(unfit, 5)}")
    return fmt, converted, unused


def load_torchvision_state(
    model: nn.Module, state: dict[str, Tensor], *, class_rows: Sequence[int] | None = None
) -> LoadReport:
    """Load a torchvision Mask R-CNN or ResNet state dict (see `convert_state`) into our MaskRCNN.

    A Mask R-CNN file must give every tensor of ours except the class-specific ones, which are re-initialised (kept as
    they are) when `class_rows` is None or their class count differs from the model's. A ResNet file gives the
    backbone; the rest keeps its initialisation. BatchNorm's `num_batches_tracked`, which a FrozenBatchNorm2d model
    has no place for, is skipped. Any other missing, unexpected or misshapen tensor raises WeightsFormatError naming it.
    """
    fmt, converted, unused = convert_state(state, class_rows=class_rows)
    own = model.state_dict()
    report = LoadReport(format=fmt, skipped=list(unused))
    usable: dict[str, Tensor] = {}
    unexpected, misshapen = [], []
    for name, value in converted.items():
        if name not in own:
            if name.endswith("num_batches_tracked"):
                report.skipped.append(name)
            else:
                unexpected.append(name)
        elif own[name].shape != value.shape:
            if name in CLASS_SPECIFIC:
                report.reinitialised.append(name)
            else:
                misshapen.append(f"{name}: file {tuple(value.shape)} != model {tuple(own[name].shape)}")
        else:
            usable[name] = value
    if fmt == "maskrcnn":  # class-specific tensors left out of the conversion (no class correspondence)
        report.reinitialised += [n for n in CLASS_SPECIFIC if n in own and n not in converted]
    absent = [n for n in own
              if n not in usable and n not in report.reinitialised and not n.endswith("num_batches_tracked")]
    if fmt == "resnet":
        report.fresh = absent
        absent = [n for n in absent if n.startswith("backbone.")]
    if unexpected or misshapen or absent:
        problems = [f"{what} {_short(names, 5)}" for what, names in
                    (("missing", absent), ("unexpected", unexpected), ("shape mismatch", misshapen)) if names]
        raise WeightsFormatError(f"torchvision {fmt} state dict does not fit this model: " + "; ".join(problems))
    model.load_state_dict(usable, strict=False)
    report.loaded = list(usable)
    return report


def _rename(key: str, fmt: WeightsFormat) -> str | None:
    if fmt == "resnet":
        return f"backbone.{key}" if _RESNET_KEY.match(key) else None
    for pattern, replacement in _MASKRCNN_RENAMES:
        match = pattern.match(key)
        if match:
            return replacement(match) if callable(replacement) else match.expand(replacement)
    return None


def _select_rows(value: Tensor, name: str, class_rows: Sequence[int], key: str) -> Tensor:
    """value: [C * r, ...] (r rows per class) -> [len(class_rows) * r, ...], class c's rows in class_rows order."""
    per_class = _ROWS_PER_CLASS.get(name, 1)
    classes = value.shape[0] // per_class
    rows = torch.as_tensor(list(class_rows), dtype=torch.int64)
    if rows.numel() and (rows.min() < 0 or rows.max() >= classes):
        raise WeightsFormatError(f"{key}: {classes} classes, no row {int(rows.max())} to take a class from")
    grouped = value.reshape(classes, per_class, *value.shape[1:])  # (C*r, ...) -> (C, r, ...)
    return grouped[rows].reshape(len(rows) * per_class, *value.shape[1:]).clone()


def _short(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown

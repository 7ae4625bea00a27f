"""The one typed configuration of mrcnn-pipeline.

Frozen dataclasses grouped by concern, three named presets (`coco`, `shapes`, `torchvision`), YAML load/save,
`section.field=value` overrides and the shard fingerprint. Every other module takes plain keyword
arguments; only the `build_*` factories and the pipeline stages read a `Config`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

# the settings with a fixed set of values (the CLI's choices come from these too)
Layers = Literal["heads", "3+", "4+", "5+", "all"]
Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["step", "cosine"]
GradCompression = Literal["none", "fp16"]
Amp = Literal["auto", "bf16", "fp16", "off"]
ImageEncoding = Literal["jpeg", "png"]


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ImageConfig:
    """Geometry of the network input (docs/design.md, "Geometry").

    Each image is resized keeping its aspect ratio (short side towards `min_dim`, long side at most
    `max_dim`) and zero-padded at the bottom/right to `max_dim x max_dim`.
    """

    min_dim: int = 800
    max_dim: int = 1024
    resize_mode: Literal["square"] = "square"  # resize keeping the aspect ratio, pad to max_dim x max_dim
    # how preprocess stores an image the loader cannot read as it is (CMYK, 16-bit, palette, ...), at its own size;
    # JPEG and PNG files the loader reads are stored unchanged
    encoding: ImageEncoding = "jpeg"
    jpeg_quality: int = 95
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, 0..255
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class BackboneConfig:
    depth: Literal[18, 34, 50, 101] = 50  # ResNet depth
    fpn_channels: int = 256
    frozen_bn: bool = True
    # eps of the FrozenBatchNorm2d layers (frozen_bn): x * w / sqrt(var + eps) + ...; torchvision's COCO v1 Mask R-CNN
    # weights were trained with 0.0 (its `overwrite_eps(model, 0.0)` when they are loaded)
    frozen_bn_eps: float = 1e-5
    trainable_layers: int = 5  # ResNet stages trained, counted from the top (5 = all, 0 = none)


@dataclass(frozen=True)
class RPNConfig:
    """Anchors, RPN targets and the proposal layer."""

    anchor_scales: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per FPN level, pixels
    feature_strides: tuple[int, ...] = (4, 8, 16, 32, 64)  # P2..P6
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # width / height
    anchor_stride: int = 2  # anchors at every anchor_stride-th feature cell
    # anchor centres at ((j + anchor_offset) * d, (i + anchor_offset) * d), d = anchor_stride * feature stride:
    # 0.5 puts them at the centre of their cell (mirror-symmetric, so flips work); torchvision's are at 0.0
    anchor_offset: float = 0.5
    round_anchors: bool = False  # anchor half-widths and half-heights rounded to whole pixels (torchvision's)
    positive_iou: float = 0.7
    negative_iou: float = 0.3
    crowd_iou: float = 0.001
    anchors_per_image: int = 256  # the per-step sample
    positive_fraction: float = 0.5
    pre_nms_topk: int = 6000
    pre_nms_per_level: bool = False  # pre_nms_topk of each FPN level (torchvision's) rather than of the whole image
    nms_threshold: float = 0.7
    nms_per_level: bool = False  # NMS within each FPN level (torchvision's) rather than over the whole image
    min_size: float = 1.0  # proposals narrower or lower than this (px, after clipping) are dropped; torchvision 1e-3
    post_nms_train: int = 2000
    post_nms_test: int = 1000
    bbox_std: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    head_channels: int = 0  # 0: same as fpn_channels


@dataclass(frozen=True)
class RoIConfig:
    """Detection-target layer and the box/mask heads."""

    rois_per_image: int = 200
    positive_fraction: float = 0.33
    positive_iou: float = 0.5
    pool_size: int = 7
    mask_pool_size: int = 14
    sampling_ratio: int = 2  # RoIAlign bilinear samples per bin side (torchvision's default 2; 0 = adaptive)
    # RoIAlign's `aligned`: True samples at pixel centres (x - 0.5, our box convention); torchvision's
    # MultiScaleRoIAlign uses False
    aligned: bool = True
    fc_dim: int = 1024
    mask_conv_dim: int = 256
    mask_conv_layers: int = 4
    canonical_level: int = 4  # k0 in the FPN paper's eq. 1
    canonical_size: int = 224
    bbox_std: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    max_gt_instances: int = 100


@dataclass(frozen=True)
class MaskConfig:
    mini_mask_size: int = 56
    mask_size: int = 28  # mask-head output and target size


@dataclass(frozen=True)
class DetectionConfig:
    min_confidence: float = 0.7
    nms_threshold: float = 0.3
    max_detections: int = 100
    min_size: float = 0.01  # detections narrower or lower than this (px, after clipping) are dropped (torchvision's)


@dataclass(frozen=True)
class TrainConfig:
    optimizer: Optimizer = "sgd"  # momentum is AdamW's beta1
    lr: float = 0.02
    lr_reference_batch: int = 16  # lr is given per this many images, scaled linearly with the global batch
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    batch_size: int = 2  # per worker
    epochs: int = 12
    steps: int = 0  # > 0 overrides epochs
    warmup_steps: int = 500
    schedule: Schedule = "step"
    decay_at: tuple[float, ...] = (0.67, 0.89)  # fractions of the run, for "step"
    decay_factor: float = 0.1
    checkpoint_every: int = 500
    log_every: int = 20
    val_every: int = 1  # validation loss after every this many epochs and after the last step; 0: the last only
    grad_compression: GradCompression = "none"  # "fp16": DDP all-reduces gradients in half precision
    # post-local SGD (pipelines/training/local_sgd.py): after the warm-up each worker steps on its own gradients and
    # the workers' weights are averaged every this many steps; 0: off, DDP all-reduces the gradients every step.
    # For CPU workers sharing a box, where the every-step all-reduce ties the workers together (BENCHMARKS.md)
    local_sgd_every: int = 0
    # mixed precision (pipelines/training/precision.py): auto = bf16 autocast on a GPU that has bf16 (A100, H100,
    # L4), fp16 with a GradScaler on one that has not (V100, T4), off on CPU; bf16 / fp16 / off force a choice
    amp: Amp = "auto"
    # batches Ray Data prepares ahead of the step on the GPU worker: pinned, copied to the device with
    # non_blocking=True on a background thread (`iter_torch_batches(prefetch_batches=, pin_memory=)`)
    prefetch_batches: int = 2
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark on GPU workers (fixed input sizes)
    channels_last: bool = False  # the model in channels_last memory format (the shapes preset: 10% faster on CPU)
    # decode the splits once into Ray's object store (`Dataset.materialize`) instead of re-reading the shards every
    # epoch: for datasets that fit in memory (the demo's: an epoch then starts in under a second, not ~8 s). On one
    # node only: a lost node takes its cached blocks with it and training cannot restore (tests/cluster)
    cache_data: bool = False
    num_to_keep: int = 3
    max_failures: int = 2
    max_nonfinite_in_a_row: int = 10
    layers: Layers = "all"  # the ResNet stages trained (matterport's names)
    seed: int = 0
    flip: bool = True
    loss_rpn_cls: float = 1.0
    loss_rpn_box: float = 1.0
    loss_cls: float = 1.0
    loss_box: float = 1.0
    loss_mask: float = 1.0


@dataclass(frozen=True)
class PreprocessConfig:
    drop_empty_train: bool = True  # images without annotations are dropped from training splits
    rows_per_shard: int = 512
    rows_per_row_group: int = 16


@dataclass(frozen=True)
class EvalConfig:
    # score threshold before the detection layer's NMS in evaluation (detectron2's and torchvision's 0.05): at 0.0
    # every (RoI, class) pair, about 80k boxes per 1024 px image at `coco`, goes into class-wise NMS. A 300-step
    # shapes model on 48 synthetic val images: bbox AP 0.1625 vs 0.1645 at 0.0, segm AP 0.1918 vs 0.1922, in 44%
    # of the evaluation's time (BENCHMARKS.md, "Evaluation"); 0.0 keeps every detection
    min_confidence: float = 0.05
    batch_size: int = 4


@dataclass(frozen=True)
class Config:
    name: str = "coco"
    image: ImageConfig = field(default_factory=ImageConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi: RoIConfig = field(default_factory=RoIConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        _validate(self)

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _build(cls, data, prefix="")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
        return cls.from_dict(data)

    # ----------------------------------------------------------------- overrides
    def override(self, assignments: list[str] | tuple[str, ...]) -> Config:
        """Apply `section.field=value` strings (value parsed as YAML), e.g. `train.lr=0.01`."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r}: expected section.field=value")
            parts = key.strip().split(".")
            if len(parts) == 1 and parts[0] == "name":
                data["name"] = raw
                continue
            if len(parts) != 2:
                raise ConfigError(f"override {item!r}: expected section.field=value")
            section, name = parts
            if section not in data or not isinstance(data[section], dict):
                raise ConfigError(f"unknown config section {section!r} (in {item!r})")
            if name not in data[section]:
                raise ConfigError(f"unknown config key {key!r}")
            value = yaml.safe_load(raw)
            hint = typing.get_type_hints(type(getattr(self, section))).get(name)
            allowed = choices(hint) if hint is not None else None
            if allowed and all(isinstance(a, str) for a in allowed):
                value = raw.strip()  # a word setting takes the word: YAML would read `off` / `no` as a bool
            data[section][name] = value
        return Config.from_dict(data)

    # ----------------------------------------------------------------- fingerprint
    def shard_fields(self) -> dict[str, Any]:
        """Every field that changes preprocessed shard content (docs/design.md, "The manifest")."""
        img, rpn, mask = self.image, self.rpn, self.mask
        return {
            "image.min_dim": img.min_dim,
            "image.max_dim": img.max_dim,
            "image.resize_mode": img.resize_mode,
            "image.encoding": img.encoding,
            "image.jpeg_quality": img.jpeg_quality,
            "rpn.anchor_scales": list(rpn.anchor_scales),
            "rpn.feature_strides": list(rpn.feature_strides),
            "rpn.anchor_ratios": list(rpn.anchor_ratios),
            "rpn.anchor_stride": rpn.anchor_stride,
            "rpn.anchor_offset": rpn.anchor_offset,
            "rpn.round_anchors": rpn.round_anchors,
            "rpn.positive_iou": rpn.positive_iou,
            "rpn.negative_iou": rpn.negative_iou,
            "rpn.crowd_iou": rpn.crowd_iou,
            "rpn.bbox_std": list(rpn.bbox_std),
            "mask.mini_mask_size": mask.mini_mask_size,
            "roi.max_gt_instances": self.roi.max_gt_instances,
            "preprocess.drop_empty_train": self.preprocess.drop_empty_train,
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.shard_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# shard fields added after shards were first written, with the value every shard written before them has: a manifest
# (or a checkpoint's config) without one of them is read as having this value
LEGACY_SHARD_FIELDS: dict[str, Any] = {"rpn.anchor_offset": 0.5, "rpn.round_anchors": False}


def fingerprint_diff(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Names of the shard fields whose values differ, e.g. ['image.max_dim: 1024 != 256']; a field of
    `LEGACY_SHARD_FIELDS` missing on one side counts as its legacy value."""
    keys = sorted(set(expected) | set(actual))

    def value(fields: dict[str, Any], key: str) -> Any:
        return fields[key] if key in fields else LEGACY_SHARD_FIELDS.get(key)

    return [f"{k}: {value(expected, k)!r} != {value(actual, k)!r}" for k in keys
            if value(expected, k) != value(actual, k)]


# --------------------------------------------------------------------- presets
def coco() -> Config:
    """The seed design for MS-COCO: 1024 px, ResNet-50-FPN, 65,472 anchors per image."""
    return Config(name="coco")


def shapes() -> Config:
    """Small and fast, for the synthetic dataset and the tests: 128 px, ResNet-18, 64-channel FPN."""
    return Config(
        name="shapes",
        image=ImageConfig(min_dim=128, max_dim=128, jpeg_quality=95),
        backbone=BackboneConfig(depth=18, fpn_channels=64, frozen_bn=False),
        # The shapes are 10-50 px (sqrt of area) at 128 px: 16 px anchors on P2 and a 0.5 IoU positive
        # threshold give each object about 7 positive anchors; 8 px anchors and 0.7 gave 0.1, and the RPN
        # barely learned (proposals' best IoU with the objects about 0.5; segm AP 0.05 vs 0.19 after 400 steps)
        # 64 anchors a step, 500 before NMS and 200 proposals: a handful of shapes an image need no more (issue 20)
        rpn=RPNConfig(
            anchor_scales=(16, 32, 64, 128, 256),
            anchor_stride=1,
            positive_iou=0.5,
            anchors_per_image=64,
            pre_nms_topk=500,
            post_nms_train=200,
            post_nms_test=200,
        ),
        # Judged at the demo's fixed wall-clock budget (BENCHMARKS.md, issue 20): 64 RoIs at 1/4 positive (16
        # positives through the mask head) scored segm AP 0.715 / AP50 0.873 after 800 x 8 where 32 RoIs gave
        # 0.648 / 0.814; 32-channel mask convolutions step 1.18x faster than 64 with no loss measured.
        # sampling_ratio 1: RoIAlign's backward is a fifth of the step on a CPU at 2 (the shapes
        # are small, bins under a P2 cell, so one bilinear sample per bin loses nothing measurable)
        roi=RoIConfig(rois_per_image=64, positive_fraction=0.25, fc_dim=256, mask_conv_dim=32, max_gt_instances=20,
                      sampling_ratio=1),
        mask=MaskConfig(mini_mask_size=56, mask_size=28),
        detection=DetectionConfig(min_confidence=0.5, nms_threshold=0.3, max_detections=20),
        train=TrainConfig(
            # AdamW trains this small from-scratch model much faster than SGD: segm AP 0.34 vs 0.15 after 400
            # steps of 4 (lr 0.004 / 0.008 / 0.016 per 16 images: 0.32 / 0.34 / 0.25); BENCHMARKS.md
            optimizer="adamw",
            lr=0.008,
            # per worker; the demo runs 2 workers, 8 images a step (8 rather than 4 a step: segm AP 0.24 vs 0.13
            # after 800 steps), and 2 one-thread workers step 1.6x faster than one on 2 cores
            batch_size=4,
            epochs=0,
            steps=900,  # the demo in about 9 minutes on 2 cores with its other stages (BENCHMARKS.md)
            warmup_steps=100,
            # after the warm-up the 2 workers step alone and average their weights every 8 steps: the demo's loop
            # 10.4 -> 17 images/s under Ray Train; 900 steps: 535 s in all, segm AP 0.707 / AP50 0.869, where DDP
            # every step gave 0.664 / 0.849 in 630 s at 650 steps
            local_sgd_every=8,
            schedule="cosine",
            checkpoint_every=200,
            log_every=10,
            # the demo's 2 workers share 2 cores: each epoch's validation re-streams the split (about 10 s), so
            # validate once at the end (the demo also sets train.cache_data, which a multi-node run must not:
            # cached blocks die with their node)
            val_every=0,
            channels_last=True,  # 10% faster a step on a CPU (oneDNN)
        ),
        preprocess=PreprocessConfig(rows_per_shard=256, rows_per_row_group=16),
        evaluate=EvalConfig(batch_size=8),
    )


def torchvision_maskrcnn() -> Config:
    """torchvision's `maskrcnn_resnet50_fpn` (v1): every setting where its conventions differ from ours, so that its
    weights, converted by `mrcnn.torchvision_weights`, give its outputs (docs/design.md, "Model")."""
    return Config(
        name="torchvision",
        # torchvision resizes to 800 (short side), at most 1333 (long side); the canvas must be a multiple of 64.
        # PNG: no JPEG loss between the original image and the network
        image=ImageConfig(min_dim=800, max_dim=1344, encoding="png"),
        backbone=BackboneConfig(depth=50, fpn_channels=256, frozen_bn=True, frozen_bn_eps=0.0),
        rpn=RPNConfig(
            # torchvision's aspect ratios are height / width (0.5, 1, 2); ours are width / height, in the same order
            # of the RPN head's channels
            anchor_ratios=(2.0, 1.0, 0.5),
            anchor_stride=1,
            anchor_offset=0.0,
            round_anchors=True,
            pre_nms_topk=1000,  # torchvision's testing value (2000 in its training)
            pre_nms_per_level=True,
            nms_per_level=True,
            min_size=1e-3,
            bbox_std=(1.0, 1.0, 1.0, 1.0),  # its RPN BoxCoder's weights (1, 1, 1, 1)
        ),
        roi=RoIConfig(aligned=False, rois_per_image=512, positive_fraction=0.25),  # its box sampler: 512, 0.25
        detection=DetectionConfig(min_confidence=0.05, nms_threshold=0.5, max_detections=100, min_size=0.01),
        # anchors at j * stride are not mirror-symmetric: no flips. "3+": torchvision's trainable_backbone_layers=3
        train=TrainConfig(flip=False, layers="3+"),
        evaluate=EvalConfig(min_confidence=0.05),  # its published COCO numbers are at box_score_thresh 0.05
    )


PRESETS = {"coco": coco, "shapes": shapes, "torchvision": torchvision_maskrcnn}
# the presets of models trained here from scratch; the others reproduce pretrained weights' conventions
_OWN_PRESETS = ("coco", "shapes")


def load_config(preset_or_file: str = "coco", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """`--config PRESET_OR_FILE` plus repeatable `--set section.field=value`."""
    if preset_or_file in PRESETS:
        config = PRESETS[preset_or_file]()
    else:
        path = Path(preset_or_file)
        if not path.is_file():
            others = ", ".join(p for p in PRESETS if p not in _OWN_PRESETS)
            raise ConfigError(f"--config {preset_or_file!r}: neither a preset ({', '.join(_OWN_PRESETS)}) nor a file, "
                              f"nor a preset of pretrained weights ({others})")
        config = Config.load(path)
    return config.override(list(overrides)) if overrides else config


# --------------------------------------------------------------------- validation
def _between(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """A range check and its wording, e.g. _between(0, 1, lo_open=True) -> (check, "in (0, 1]")."""
    def check(v: float) -> bool:
        return ((lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi)))
    if hi is None:
        words = f"{'>' if lo_open else '>='} {lo}"
    elif lo is None:
        words = f"{'<' if hi_open else '<='} {hi}"
    else:
        words = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return check, words


_POSITIVE = _between(0, lo_open=True)
_AT_LEAST_1 = _between(1)
_AT_LEAST_0 = _between(0)
_FRACTION = _between(0, 1)  # [0, 1]
_OPEN_FRACTION = _between(0, 1, lo_open=True)  # (0, 1]

# the range of every numeric setting (each element, for tuples); Literal settings are checked against their choices
_RANGES: dict[str, tuple] = {
    "image.min_dim": _AT_LEAST_1, "image.max_dim": _AT_LEAST_1, "image.jpeg_quality": _between(1, 100),
    "image.pixel_std": _POSITIVE,
    "backbone.fpn_channels": _AT_LEAST_1, "backbone.trainable_layers": _between(0, 5),
    "backbone.frozen_bn_eps": _AT_LEAST_0, "rpn.anchor_offset": _between(0, 1, hi_open=True),
    "rpn.min_size": _AT_LEAST_0, "detection.min_size": _AT_LEAST_0,
    "rpn.anchor_scales": _AT_LEAST_1, "rpn.feature_strides": _AT_LEAST_1, "rpn.anchor_ratios": _POSITIVE,
    "rpn.anchor_stride": _AT_LEAST_1, "rpn.positive_iou": _OPEN_FRACTION, "rpn.negative_iou": _FRACTION,
    "rpn.crowd_iou": _FRACTION, "rpn.anchors_per_image": _AT_LEAST_1, "rpn.positive_fraction": _OPEN_FRACTION,
    "rpn.pre_nms_topk": _AT_LEAST_1, "rpn.nms_threshold": _OPEN_FRACTION, "rpn.post_nms_train": _AT_LEAST_1,
    "rpn.post_nms_test": _AT_LEAST_1, "rpn.bbox_std": _POSITIVE, "rpn.head_channels": _AT_LEAST_0,
    "roi.rois_per_image": _AT_LEAST_1, "roi.positive_fraction": _OPEN_FRACTION, "roi.positive_iou": _OPEN_FRACTION,
    "roi.pool_size": _AT_LEAST_1, "roi.mask_pool_size": _AT_LEAST_1, "roi.sampling_ratio": _AT_LEAST_0,
    "roi.fc_dim": _AT_LEAST_1, "roi.mask_conv_dim": _AT_LEAST_1, "roi.mask_conv_layers": _AT_LEAST_0,
    "roi.canonical_level": _AT_LEAST_1, "roi.canonical_size": _POSITIVE, "roi.bbox_std": _POSITIVE,
    "roi.max_gt_instances": _AT_LEAST_1,
    "mask.mini_mask_size": _AT_LEAST_1, "mask.mask_size": _AT_LEAST_1,
    "detection.min_confidence": _FRACTION, "detection.nms_threshold": _OPEN_FRACTION,
    "detection.max_detections": _AT_LEAST_1,
    "train.lr": _POSITIVE, "train.lr_reference_batch": _AT_LEAST_1, "train.momentum": _between(0, 1, hi_open=True),
    "train.weight_decay": _AT_LEAST_0, "train.grad_clip": _AT_LEAST_0, "train.batch_size": _AT_LEAST_1,
    "train.epochs": _AT_LEAST_0, "train.steps": _AT_LEAST_0, "train.warmup_steps": _AT_LEAST_0,
    "train.decay_at": _between(0, 1, lo_open=True, hi_open=True), "train.decay_factor": _OPEN_FRACTION,
    "train.local_sgd_every": _AT_LEAST_0,
    "train.checkpoint_every": _AT_LEAST_1, "train.log_every": _AT_LEAST_1, "train.val_every": _AT_LEAST_0,
    "train.num_to_keep": _AT_LEAST_1, "train.max_failures": _between(-1),  # -1: retry forever (Ray's meaning)
    "train.max_nonfinite_in_a_row": _AT_LEAST_1, "train.prefetch_batches": _AT_LEAST_1,
    "train.loss_rpn_cls": _AT_LEAST_0, "train.loss_rpn_box": _AT_LEAST_0,
    "train.loss_cls": _AT_LEAST_0, "train.loss_box": _AT_LEAST_0, "train.loss_mask": _AT_LEAST_0,
    "preprocess.rows_per_shard": _AT_LEAST_1, "preprocess.rows_per_row_group": _AT_LEAST_1,
    "evaluate.min_confidence": _FRACTION, "evaluate.batch_size": _AT_LEAST_1,
}


def choices(hint: Any) -> tuple | None:
    """The allowed values of a `Literal[...]` setting (None for any other type)."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _check_choice(key: str, hint: Any, value: Any) -> None:
    allowed = choices(hint)
    # True == 1 in Python: a bool is no choice of an int setting, nor is 1 of a str one
    if allowed is not None and not any(value == a and type(value) is type(a) for a in allowed):
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def check_flip(config: Config) -> None:
    """ConfigError naming train.flip when it is set and the anchors are off the middle of their cells
    (`rpn.anchor_offset` other than 0.5, torchvision's 0 among them): they are then not mirror-symmetric. Checked
    where training starts (a config that only evaluates or predicts may hold both)."""
    rpn = config.rpn
    if config.train.flip and rpn.anchor_offset != 0.5:
        raise ConfigError(f"config key 'train.flip': flips need mirror-symmetric anchors, and rpn.anchor_offset "
                          f"{rpn.anchor_offset} puts their centres off the middle of their cells (only 0.5 does); set "
                          "train.flip=false or rpn.anchor_offset=0.5")


def _validate(config: Config) -> None:
    """Every choice and range, then the settings that must agree; ConfigError naming the key and what is allowed."""
    for section in fields(config):
        value = getattr(config, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        hints = typing.get_type_hints(type(value))
        for f in fields(value):
            key, v = f"{section.name}.{f.name}", getattr(value, f.name)
            _check_choice(key, hints[f.name], v)
            if key in _RANGES:
                check, words = _RANGES[key]
                for item in v if isinstance(v, tuple) else (v,):
                    if not isinstance(item, (int, float)) or isinstance(item, bool) or not check(item):
                        raise ConfigError(f"config key {key!r}: {v!r} is out of range (must be {words})")
    img, rpn, train = config.image, config.rpn, config.train
    if len(rpn.anchor_scales) != len(rpn.feature_strides):
        raise ConfigError(f"config key 'rpn.anchor_scales': {len(rpn.anchor_scales)} scales for "
                          f"{len(rpn.feature_strides)} levels (rpn.feature_strides): one scale per level")
    if img.max_dim % max(rpn.feature_strides):
        raise ConfigError(f"config key 'image.max_dim': {img.max_dim} is not a multiple of the largest feature "
                          f"stride {max(rpn.feature_strides)} (rpn.feature_strides)")
    if train.flip:  # a horizontal flip maps the anchor grid onto itself only when every level's grid fits exactly
        steps = [rpn.anchor_stride * s for s in rpn.feature_strides if img.max_dim % (rpn.anchor_stride * s)]
        if steps:
            raise ConfigError(f"config key 'train.flip': flips need mirror-symmetric anchors, and image.max_dim "
                              f"{img.max_dim} is not a multiple of rpn.anchor_stride x stride = {steps[0]}; set "
                              "train.flip=false or another image.max_dim")
    if rpn.negative_iou > rpn.positive_iou:
        raise ConfigError(f"config key 'rpn.negative_iou': {rpn.negative_iou} is above rpn.positive_iou "
                          f"{rpn.positive_iou}")
    if train.steps == 0 and train.epochs == 0:
        raise ConfigError("config keys 'train.steps' and 'train.epochs' are both 0: set one of them above 0")
    if list(train.decay_at) != sorted(train.decay_at):
        raise ConfigError(f"config key 'train.decay_at': {list(train.decay_at)} must be in increasing order")


# --------------------------------------------------------------------- helpers
def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r}: expected a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], prefix + f.name)
    default = cls()
    return replace(default, **kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=key + ".")
    origin = typing.get_origin(hint)
    if origin is Literal:
        _check_choice(key, hint, value)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0]
        if len(args) > 1 and args[1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key {key!r}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(item, v, key) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    return value

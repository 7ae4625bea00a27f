"""The configuration's schema: frozen section dataclasses, each setting declared once with `mrcnn.settings.setting`
(its default, its range or choices, whether it changes shards), and `Config`, the sections together: YAML load/save,
`section.field=value` overrides, the flat view and the shard fingerprint. Validation, the shard fields and the
flat view are derived from the declarations (`mrcnn.settings`). Presets: `mrcnn.presets`; `mrcnn.config` is the
import point of all of these and `load_config`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mrcnn import settings
from mrcnn.settings import (
    ANY,
    AT_LEAST_0,
    AT_LEAST_1,
    FRACTION,
    OPEN_FRACTION,
    POSITIVE,
    ConfigError,
    between,
    setting,
)

# the settings with a fixed set of values (the CLI's choices come from these too)
Layers = Literal["heads", "3+", "4+", "5+", "all"]
Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["step", "cosine"]
GradCompression = Literal["none", "fp16"]
Amp = Literal["auto", "bf16", "fp16", "off"]
ImageEncoding = Literal["jpeg", "png"]

@dataclass(frozen=True)
class ImageConfig:
    """Geometry of the network input (docs/design.md, "Geometry").

    Each image is resized keeping its aspect ratio (short side towards `min_dim`, long side at most
    `max_dim`) and zero-padded at the bottom/right to `max_dim x max_dim`.
    """

    min_dim: int = setting(800, range=AT_LEAST_1, shard=True)
    max_dim: int = setting(1024, range=AT_LEAST_1, shard=True)
    # resize keeping the aspect ratio, pad to max_dim x max_dim
    resize_mode: Literal["square"] = setting("square", shard=True)
    # how preprocess stores an image the loader cannot read as it is (CMYK, 16-bit, palette, ...), at its own size;
    # JPEG and PNG files the loader reads are stored unchanged
    encoding: ImageEncoding = setting("jpeg", shard=True)
    jpeg_quality: int = setting(95, range=between(1, 100), shard=True)
    pixel_mean: tuple[float, float, float] = setting((123.675, 116.28, 103.53), range=ANY)  # RGB, 0..255
    pixel_std: tuple[float, float, float] = setting((58.395, 57.12, 57.375), range=POSITIVE)


@dataclass(frozen=True)
class BackboneConfig:
    depth: Literal[18, 34, 50, 101] = setting(50)  # ResNet depth
    fpn_channels: int = setting(256, range=AT_LEAST_1)
    frozen_bn: bool = setting(True)
    # eps of the FrozenBatchNorm2d layers (frozen_bn): x * w / sqrt(var + eps) + ...; torchvision's COCO v1 Mask R-CNN
    # weights were trained with 0.0 (its `overwrite_eps(model, 0.0)` when they are loaded)
    frozen_bn_eps: float = setting(1e-5, range=AT_LEAST_0)
    # ResNet stages trained, counted from the top (5 = all, 0 = none)
    trainable_layers: int = setting(5, range=between(0, 5))


@dataclass(frozen=True)
class RPNConfig:
    """Anchors, RPN targets and the proposal layer."""

    # one per FPN level, pixels
    anchor_scales: tuple[int, ...] = setting((32, 64, 128, 256, 512), range=AT_LEAST_1, shard=True)
    feature_strides: tuple[int, ...] = setting((4, 8, 16, 32, 64), range=AT_LEAST_1, shard=True)  # P2..P6
    anchor_ratios: tuple[float, ...] = setting((0.5, 1.0, 2.0), range=POSITIVE, shard=True)  # width / height
    anchor_stride: int = setting(2, range=AT_LEAST_1, shard=True)  # anchors at every anchor_stride-th feature cell
    # anchor centres at ((j + anchor_offset) * d, (i + anchor_offset) * d), d = anchor_stride * feature stride:
    # 0.5 puts them at the centre of their cell (mirror-symmetric, so flips work); torchvision's are at 0.0
    anchor_offset: float = setting(0.5, range=between(0, 1, hi_open=True), shard=True, legacy=0.5)
    # anchor half-widths and half-heights rounded to whole pixels (torchvision's)
    round_anchors: bool = setting(False, shard=True, legacy=False)
    positive_iou: float = setting(0.7, range=OPEN_FRACTION, shard=True)
    negative_iou: float = setting(0.3, range=FRACTION, shard=True)
    crowd_iou: float = setting(0.001, range=FRACTION, shard=True)
    anchors_per_image: int = setting(256, range=AT_LEAST_1)  # the per-step sample
    positive_fraction: float = setting(0.5, range=OPEN_FRACTION)
    pre_nms_topk: int = setting(6000, range=AT_LEAST_1)
    # pre_nms_topk of each FPN level (torchvision's) rather than of the whole image
    pre_nms_per_level: bool = setting(False)
    nms_threshold: float = setting(0.7, range=OPEN_FRACTION)
    nms_per_level: bool = setting(False)  # NMS within each FPN level (torchvision's) rather than over the whole image
    # proposals narrower or lower than this (px, after clipping) are dropped; torchvision 1e-3
    min_size: float = setting(1.0, range=AT_LEAST_0)
    post_nms_train: int = setting(2000, range=AT_LEAST_1)
    post_nms_test: int = setting(1000, range=AT_LEAST_1)
    bbox_std: tuple[float, float, float, float] = setting((0.1, 0.1, 0.2, 0.2), range=POSITIVE, shard=True)
    head_channels: int = setting(0, range=AT_LEAST_0)  # 0: same as fpn_channels


@dataclass(frozen=True)
class RoIConfig:
    """Detection-target layer and the box/mask heads."""

    rois_per_image: int = setting(200, range=AT_LEAST_1)
    positive_fraction: float = setting(0.33, range=OPEN_FRACTION)
    positive_iou: float = setting(0.5, range=OPEN_FRACTION)
    pool_size: int = setting(7, range=AT_LEAST_1)
    mask_pool_size: int = setting(14, range=AT_LEAST_1)
    # RoIAlign bilinear samples per bin side (torchvision's default 2; 0 = adaptive)
    sampling_ratio: int = setting(2, range=AT_LEAST_0)
    # RoIAlign's `aligned`: True samples at pixel centres (x - 0.5, our box convention); torchvision's
    # MultiScaleRoIAlign uses False
    aligned: bool = setting(True)
    fc_dim: int = setting(1024, range=AT_LEAST_1)
    mask_conv_dim: int = setting(256, range=AT_LEAST_1)
    mask_conv_layers: int = setting(4, range=AT_LEAST_0)
    canonical_level: int = setting(4, range=AT_LEAST_1)  # k0 in the FPN paper's eq. 1
    canonical_size: int = setting(224, range=POSITIVE)
    bbox_std: tuple[float, float, float, float] = setting((0.1, 0.1, 0.2, 0.2), range=POSITIVE)
    max_gt_instances: int = setting(100, range=AT_LEAST_1, shard=True)


@dataclass(frozen=True)
class MaskConfig:
    mini_mask_size: int = setting(56, range=AT_LEAST_1, shard=True)
    mask_size: int = setting(28, range=AT_LEAST_1)  # mask-head output and target size


@dataclass(frozen=True)
class DetectionConfig:
    min_confidence: float = setting(0.7, range=FRACTION)
    nms_threshold: float = setting(0.3, range=OPEN_FRACTION)
    max_detections: int = setting(100, range=AT_LEAST_1)
    # detections narrower or lower than this (px, after clipping) are dropped (torchvision's)
    min_size: float = setting(0.01, range=AT_LEAST_0)


@dataclass(frozen=True)
class TrainConfig:
    optimizer: Optimizer = setting("sgd")  # momentum is AdamW's beta1
    lr: float = setting(0.02, range=POSITIVE)
    # lr is given per this many images, scaled linearly with the global batch
    lr_reference_batch: int = setting(16, range=AT_LEAST_1)
    momentum: float = setting(0.9, range=between(0, 1, hi_open=True))
    weight_decay: float = setting(1e-4, range=AT_LEAST_0)
    grad_clip: float = setting(5.0, range=AT_LEAST_0)
    batch_size: int = setting(2, range=AT_LEAST_1)  # per worker
    epochs: int = setting(12, range=AT_LEAST_0)
    steps: int = setting(0, range=AT_LEAST_0)  # > 0 overrides epochs
    warmup_steps: int = setting(500, range=AT_LEAST_0)
    schedule: Schedule = setting("step")
    # fractions of the run, for "step"
    decay_at: tuple[float, ...] = setting((0.67, 0.89), range=between(0, 1, lo_open=True, hi_open=True))
    decay_factor: float = setting(0.1, range=OPEN_FRACTION)
    checkpoint_every: int = setting(500, range=AT_LEAST_1)
    log_every: int = setting(20, range=AT_LEAST_1)
    # seconds between samples of the run's system metrics in MLflow (CPU, memory, each GPU's utilisation and
    # memory; pipelines/infra/system_metrics.py); 0: none
    system_metrics_interval: float = setting(10.0, range=AT_LEAST_0)
    # validation loss after every this many epochs and after the last step; 0: the last only
    val_every: int = setting(1, range=AT_LEAST_0)
    # with each validation loss, the COCO bbox and segm AP (`bbox_AP`, `segm_AP`) of a quick evaluation on the first
    # this many validation images by id (pipelines/training/hooks/ap_eval.py; `mrcnn-cli tune --metric segm_AP`);
    # 0: none
    val_ap_images: int = setting(0, range=AT_LEAST_0)
    grad_compression: GradCompression = setting("none")  # "fp16": DDP all-reduces gradients in half precision
    # post-local SGD (pipelines/training/local_sgd.py): after the warm-up each worker steps on its own gradients and
    # the workers' weights are averaged every this many steps; 0: off, DDP all-reduces the gradients every step.
    # For CPU workers sharing a box, where the every-step all-reduce ties the workers together (BENCHMARKS.md)
    local_sgd_every: int = setting(0, range=AT_LEAST_0)
    # mixed precision (pipelines/training/precision.py): auto = bf16 autocast on a GPU that has bf16 (A100, H100,
    # L4), fp16 with a GradScaler on one that has not (V100, T4), off on CPU; bf16 / fp16 / off force a choice
    amp: Amp = setting("auto")
    # batches Ray Data prepares ahead of the step on the GPU worker: pinned, copied to the device with
    # non_blocking=True on a background thread (`iter_torch_batches(prefetch_batches=, pin_memory=)`)
    prefetch_batches: int = setting(2, range=AT_LEAST_1)
    cudnn_benchmark: bool = setting(False)  # torch.backends.cudnn.benchmark on GPU workers (fixed input sizes)
    # the model in channels_last memory format (the shapes preset: 10% faster on CPU)
    channels_last: bool = setting(False)
    # decode the splits once into Ray's object store (`Dataset.materialize`) instead of re-reading the shards every
    # epoch: for datasets that fit in memory (the demo's: an epoch then starts in under a second, not ~8 s). On one
    # node only: a lost node takes its cached blocks with it and training cannot restore (tests/cluster)
    cache_data: bool = setting(False)
    # the logged MLflow model also holds the model as ONNX (`mrcnn-cli export`'s file, batch 1; `model.onnx` among
    # its extra files): off by default, the trace takes tens of seconds at the coco preset
    export_onnx: bool = setting(False)
    num_to_keep: int = setting(3, range=AT_LEAST_1)
    max_failures: int = setting(2, range=between(-1))  # -1: retry forever (Ray's meaning)
    max_nonfinite_in_a_row: int = setting(10, range=AT_LEAST_1)
    layers: Layers = setting("all")  # the ResNet stages trained (matterport's names)
    seed: int = setting(0, range=ANY)
    flip: bool = setting(True)
    loss_rpn_cls: float = setting(1.0, range=AT_LEAST_0)
    loss_rpn_box: float = setting(1.0, range=AT_LEAST_0)
    loss_cls: float = setting(1.0, range=AT_LEAST_0)
    loss_box: float = setting(1.0, range=AT_LEAST_0)
    loss_mask: float = setting(1.0, range=AT_LEAST_0)


@dataclass(frozen=True)
class PreprocessConfig:
    drop_empty_train: bool = setting(True, shard=True)  # images without annotations are dropped from training splits
    rows_per_shard: int = setting(512, range=AT_LEAST_1)
    rows_per_row_group: int = setting(16, range=AT_LEAST_1)


@dataclass(frozen=True)
class EvalConfig:
    # score threshold before the detection layer's NMS in evaluation (detectron2's and torchvision's 0.05): at 0.0
    # every (RoI, class) pair, about 80k boxes per 1024 px image at `coco`, goes into class-wise NMS. A 300-step
    # shapes model on 48 synthetic val images: bbox AP 0.1625 vs 0.1645 at 0.0, segm AP 0.1918 vs 0.1922, in 44%
    # of the evaluation's time (BENCHMARKS.md, "Evaluation"); 0.0 keeps every detection
    min_confidence: float = setting(0.05, range=FRACTION)
    batch_size: int = setting(4, range=AT_LEAST_1)



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
        return settings.plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """{"name": ..., "section.field": value, ...}: a run's MLflow params, and the form configs are compared in."""
        return settings.flat(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return settings.build(cls, data)

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
            allowed = settings.choices(hint) if hint is not None else None
            if allowed and all(isinstance(a, str) for a in allowed):
                value = raw.strip()  # a word setting takes the word: YAML would read `off` / `no` as a bool
            data[section][name] = value
        return Config.from_dict(data)

    # ----------------------------------------------------------------- fingerprint
    def shard_fields(self) -> dict[str, Any]:
        """Every field that changes preprocessed shard content (docs/design.md, "The manifest"): those declared
        `shard=True`, as {"section.field": value}."""
        return settings.shard_fields(self)

    def fingerprint(self) -> str:
        blob = json.dumps(self.shard_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# shard fields added after shards were first written, with the value every shard written before them has (declared
# with `legacy=` on the field): a manifest (or a checkpoint's config) without one of them is read as having this value
LEGACY_SHARD_FIELDS: dict[str, Any] = settings.legacy_shard_fields(Config)


def fingerprint_diff(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Names of the shard fields whose values differ, e.g. ['image.max_dim: 1024 != 256']; a field of
    `LEGACY_SHARD_FIELDS` missing on one side counts as its legacy value."""
    keys = sorted(set(expected) | set(actual))

    def value(fields: dict[str, Any], key: str) -> Any:
        return fields[key] if key in fields else LEGACY_SHARD_FIELDS.get(key)

    return [f"{k}: {value(expected, k)!r} != {value(actual, k)!r}" for k in keys
            if value(expected, k) != value(actual, k)]


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
    """Every declared choice and range, then the settings that must agree; ConfigError naming the key and what
    is allowed."""
    settings.validate_fields(config)
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

"""The named configurations: `coco` (the seed design), `shapes` (small and fast, for the synthetic dataset and the
tests) and `torchvision` (the conventions of torchvision's pretrained Mask R-CNN). Each is a `Config` of the schema's
defaults with the settings where it differs, and why."""

from __future__ import annotations

from mrcnn.schema import (
    BackboneConfig,
    Config,
    DetectionConfig,
    EvalConfig,
    ImageConfig,
    MaskConfig,
    PreprocessConfig,
    RoIConfig,
    RPNConfig,
    TrainConfig,
)


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
OWN_PRESETS = ("coco", "shapes")

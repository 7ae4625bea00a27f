"""Mask R-CNN: composes the parts; `build_model` is the only place that reads the Config.

    images (uint8) -> normalise -> ResNet (C2..C5) -> FPN (P2..P6) -> RPN head -> proposal layer
      training: RPN losses; detection-target sample -> box head (P2..P5) -> cls/box losses;
                positives -> mask head -> mask loss
      eval:     box head -> detection layer -> mask head on the detections -> per-image detections

Glossary: N images, S = image.max_dim (inputs are S x S, the image at the top-left), A anchors, K classes
including background (0). Boxes: (x1, y1, x2, y2) in padded-image pixels.

`forward(batch)` takes the loader's Batch dict (fixed shapes, G = roi.max_gt_instances): `images` uint8 [N, 3, S, S],
`windows` int64 [N, 4] and, in training, `gt_class_ids` [N, G], `gt_boxes` [N, G, 4], `gt_mini_masks`
[N, G, m, m], `crowd_boxes` [N, C, 4], `rpn_match` int8 [N, A], `rpn_deltas` [N, A, 4] (or, as the loader ships
them, `rpn_pos_idx` [N, K] and `rpn_pos_deltas` [N, K, 4], scattered into the dense form here).
Training returns {loss_rpn_cls, loss_rpn_box, loss_cls, loss_box, loss_mask}, each already multiplied by its
train.loss_* weight. Eval returns one dict per image: boxes [D, 4] padded px, class_ids int64 [D], scores [D],
masks [D, M, M] float probabilities of the predicted class (M = mask.mask_size).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mrcnn.anchors import anchors_from_config, anchors_per_level, flip_permutation_from_config
from mrcnn.backbone import ResNetBackbone
from mrcnn.config import Config
from mrcnn.detection_targets import sample_detection_targets
from mrcnn.detections import detect
from mrcnn.fpn import FPN
from mrcnn.losses import box_losses, mask_loss, rpn_losses
from mrcnn.proposals import generate_proposals
from mrcnn.roi_heads import BoxHead, MaskHead, pool_rois
from mrcnn.rpn import RPNHead
from mrcnn.rpn_targets import scatter_positive_deltas

LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask")


class MaskRCNN(nn.Module):
    """The model from finished parts plus plain settings (see `build_model` for where each comes from).

    proposal_settings: generate_proposals kwargs except post_nms_topk (pre_nms_topk, nms_threshold, bbox_std,
    min_size, level_sizes, pre_nms_per_level, nms_per_level);
    post_nms_train / post_nms_test: proposals kept per image; rpn_sample_settings: rpn_losses kwargs
    (num_samples, positive_fraction); target_settings: sample_detection_targets kwargs; pool_settings:
    pool_rois kwargs except output_size (strides, canonical_level, canonical_size, sampling_ratio, aligned);
    detection_settings: detect kwargs; loss_weights: one weight per LOSS_KEYS entry. anchors: [A, 4];
    flip_perm: int64 [A] or None.
    """

    def __init__(
        self,
        *,
        backbone: ResNetBackbone,
        fpn: FPN,
        rpn_head: RPNHead,
        box_head: BoxHead,
        mask_head: MaskHead,
        anchors: Tensor,
        flip_perm: Tensor | None,
        pixel_mean: tuple[float, float, float],
        pixel_std: tuple[float, float, float],
        proposal_settings: dict[str, Any],
        post_nms_train: int,
        post_nms_test: int,
        rpn_sample_settings: dict[str, Any],
        target_settings: dict[str, Any],
        pool_size: int,
        mask_pool_size: int,
        pool_settings: dict[str, Any],
        detection_settings: dict[str, Any],
        loss_weights: dict[str, float],
    ):
        super().__init__()
        self.backbone, self.fpn, self.rpn_head = backbone, fpn, rpn_head
        self.box_head, self.mask_head = box_head, mask_head
        # Constants derived from the config, not learned: non-persistent, so checkpoints hold weights only
        # and follow .to(device).
        self.register_buffer("anchors", anchors.float(), persistent=False)
        self.register_buffer("flip_perm", flip_perm, persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        self.proposal_settings = dict(proposal_settings)
        self.post_nms_train, self.post_nms_test = post_nms_train, post_nms_test
        self.rpn_sample_settings = dict(rpn_sample_settings)
        self.target_settings = dict(target_settings)
        self.pool_size, self.mask_pool_size = pool_size, mask_pool_size
        self.pool_settings = dict(pool_settings)
        self.detection_settings = dict(detection_settings)  # e.g. set ["min_confidence"] = 0.0 for COCO eval
        self.loss_weights = {key: float(loss_weights[key]) for key in LOSS_KEYS}

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [N, 3, S, S] RGB -> float [N, 3, S, S], (x - pixel_mean) / pixel_std per channel."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    def features(self, images: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """Normalise, backbone, FPN, RPN head: ([P2..P6], objectness [N, A], rpn deltas [N, A, 4])."""
        pyramid = self.fpn(self.backbone(self.normalize(images)))
        objectness, deltas = self.rpn_head(pyramid)
        if objectness.shape[1] != self.anchors.shape[0]:
            raise ValueError(
                f"RPN produced {objectness.shape[1]} anchor outputs for {self.anchors.shape[0]} anchors: "
                f"images of size {tuple(images.shape[-2:])} do not match the configured image.max_dim"
            )
        return pyramid, objectness, deltas

    def pool(self, pyramid: list[Tensor], rois: Tensor, output_size: int) -> Tensor:
        """rois: [R, 5] (image index, x1, y1, x2, y2) -> [R, C, s, s] from P2..P5 (P6 is for the RPN only)."""
        levels = len(self.pool_settings["strides"])
        return pool_rois(pyramid[:levels], rois, output_size=output_size, **self.pool_settings)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        pyramid, objectness, rpn_deltas = self.features(batch["images"])
        windows = batch["windows"]
        post_nms = self.post_nms_train if self.training else self.post_nms_test
        proposals, _ = generate_proposals(
            objectness, rpn_deltas, self.anchors, windows, post_nms_topk=post_nms, **self.proposal_settings
        )
        if self.training:
            return self._losses(batch, pyramid, objectness, rpn_deltas, proposals)
        return self._detections(pyramid, proposals, windows)

    def _losses(
        self,
        batch: dict[str, Tensor],
        pyramid: list[Tensor],
        objectness: Tensor,
        rpn_deltas: Tensor,
        proposals: list[Tensor],
    ) -> dict[str, Tensor]:
        if "rpn_deltas" in batch:
            rpn_targets = batch["rpn_deltas"]
        else:  # the loader's sparse form (rpn_pos_idx [N, K], rpn_pos_deltas [N, K, 4]), made dense here
            rpn_targets = scatter_positive_deltas(self.anchors.shape[0], batch["rpn_pos_idx"], batch["rpn_pos_deltas"])
        loss_rpn_cls, loss_rpn_box = rpn_losses(
            objectness, rpn_deltas, batch["rpn_match"], rpn_targets, **self.rpn_sample_settings
        )
        targets = sample_detection_targets(
            proposals,
            gt_class_ids=batch["gt_class_ids"],
            gt_boxes=batch["gt_boxes"],
            gt_mini_masks=batch["gt_mini_masks"],
            crowd_boxes=batch["crowd_boxes"],
            **self.target_settings,
        )
        rois = targets.rois_with_index()  # [R, 5]
        class_logits, box_deltas = self.box_head(self.pool(pyramid, rois, self.pool_size))
        loss_cls, loss_box = box_losses(class_logits, box_deltas, targets.class_ids, targets.deltas)
        positive = targets.positive
        mask_logits = self.mask_head(self.pool(pyramid, rois[positive], self.mask_pool_size))  # [P, K, M, M]
        loss_mask_value = mask_loss(mask_logits, targets.class_ids[positive], targets.masks)
        losses = dict(zip(LOSS_KEYS, (loss_rpn_cls, loss_rpn_box, loss_cls, loss_box, loss_mask_value), strict=True))
        return {key: value * self.loss_weights[key] for key, value in losses.items()}

    @torch.no_grad()
    def _detections(self, pyramid: list[Tensor], proposals: list[Tensor], windows: Tensor) -> list[dict[str, Tensor]]:
        rois = torch.cat(proposals)  # [R, 4]
        image_idx = torch.cat([torch.full((len(p),), i, device=rois.device) for i, p in enumerate(proposals)])
        rois5 = torch.cat([image_idx.unsqueeze(1).to(rois.dtype), rois], dim=1)
        class_logits, box_deltas = self.box_head(self.pool(pyramid, rois5, self.pool_size))
        detections = detect(class_logits, box_deltas, rois, image_idx.long(), windows, **self.detection_settings)
        # The mask head sees the refined detection boxes, as at test time in the paper.
        boxes = torch.cat([d["boxes"] for d in detections])  # [D_total, 4]
        det_image = torch.cat([torch.full((len(d["boxes"]),), i, device=rois.device) for i, d in enumerate(detections)])
        det_rois = torch.cat([det_image.unsqueeze(1).to(boxes.dtype), boxes], dim=1)
        mask_logits = self.mask_head(self.pool(pyramid, det_rois, self.mask_pool_size))  # [D_total, K, M, M]
        class_ids = torch.cat([d["class_ids"] for d in detections])
        probs = torch.sigmoid(mask_logits[torch.arange(len(class_ids), device=rois.device), class_ids].float())
        masks = torch.split(probs, [len(d["boxes"]) for d in detections])
        return [
            {"boxes": d["boxes"], "class_ids": d["class_ids"], "scores": d["scores"], "masks": m}
            for d, m in zip(detections, masks, strict=True)
        ]


def build_model(config: Config, num_classes: int) -> MaskRCNN:
    """A MaskRCNN for `config`, with `num_classes` classes including background (COCO: 81).

    Backbone weights are random (weights=None); load pretrained ones with
    `mrcnn.backbone.load_backbone_weights(model, path)`.
    """
    bb, rpn, roi, mask = config.backbone, config.rpn, config.roi, config.mask
    if mask.mask_size != 2 * roi.mask_pool_size:
        raise ValueError(f"mask.mask_size ({mask.mask_size}) must be 2 x roi.mask_pool_size ({roi.mask_pool_size})")
    backbone = ResNetBackbone(bb.depth, frozen_bn=bb.frozen_bn, trainable_layers=bb.trainable_layers,
                              frozen_bn_eps=bb.frozen_bn_eps)
    fpn = FPN(backbone.out_channels, bb.fpn_channels)
    rpn_head = RPNHead(
        bb.fpn_channels, len(rpn.anchor_ratios), head_channels=rpn.head_channels, anchor_stride=rpn.anchor_stride
    )
    pool_strides = tuple(rpn.feature_strides[:4])  # P2..P5
    try:
        flip_perm = flip_permutation_from_config(config)
    except ValueError:  # anchors not mirror-symmetric for this image size: no flip augmentation possible
        flip_perm = None
    return MaskRCNN(
        backbone=backbone,
        fpn=fpn,
        rpn_head=rpn_head,
        box_head=BoxHead(bb.fpn_channels, roi.pool_size, roi.fc_dim, num_classes),
        mask_head=MaskHead(bb.fpn_channels, roi.mask_conv_dim, roi.mask_conv_layers, num_classes),
        anchors=anchors_from_config(config),
        flip_perm=flip_perm,
        pixel_mean=config.image.pixel_mean,
        pixel_std=config.image.pixel_std,
        proposal_settings={
            "pre_nms_topk": rpn.pre_nms_topk,
            "nms_threshold": rpn.nms_threshold,
            "bbox_std": rpn.bbox_std,
            "min_size": rpn.min_size,
            "level_sizes": tuple(anchors_per_level(
                image_size=config.image.max_dim, scales=rpn.anchor_scales, feature_strides=rpn.feature_strides,
                ratios=rpn.anchor_ratios, anchor_stride=rpn.anchor_stride,
            )),
            "pre_nms_per_level": rpn.pre_nms_per_level,
            "nms_per_level": rpn.nms_per_level,
        },
        post_nms_train=rpn.post_nms_train,
        post_nms_test=rpn.post_nms_test,
        rpn_sample_settings={"num_samples": rpn.anchors_per_image, "positive_fraction": rpn.positive_fraction},
        target_settings={
            "rois_per_image": roi.rois_per_image,
            "positive_fraction": roi.positive_fraction,
            "positive_iou": roi.positive_iou,
            "crowd_iou": rpn.crowd_iou,
            "bbox_std": roi.bbox_std,
            "mask_size": mask.mask_size,
        },
        pool_size=roi.pool_size,
        mask_pool_size=roi.mask_pool_size,
        pool_settings={
            "strides": pool_strides,
            "canonical_level": roi.canonical_level,
            "canonical_size": roi.canonical_size,
            "sampling_ratio": roi.sampling_ratio,
            "aligned": roi.aligned,
        },
        detection_settings={
            "bbox_std": roi.bbox_std,
            "min_confidence": config.detection.min_confidence,
            "nms_threshold": config.detection.nms_threshold,
            "max_detections": config.detection.max_detections,
            "min_size": config.detection.min_size,
        },
        loss_weights={key: getattr(config.train, key) for key in LOSS_KEYS},
    )

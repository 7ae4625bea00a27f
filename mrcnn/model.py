"""Mask R-CNN: composes the parts, each built by the `from_config` beside its class (`MaskRCNN.from_config`).

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
masks [D, M, M] float probabilities of the predicted class (M = mask.mask_size); under ONNX export the same padded to
[N, D_max, ...] with a count (`mrcnn/export.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mrcnn.anchors import anchors_from_config, flip_permutation_from_config
from mrcnn.backbone import ResNetBackbone
from mrcnn.detection_targets import DetectionTargetSettings
from mrcnn.detections import DetectionSettings, pad_per_image
from mrcnn.fpn import FPN
from mrcnn.losses import RPNSampleSettings, box_losses, mask_loss
from mrcnn.proposals import ProposalSettings, split_by_image
from mrcnn.roi_heads import BoxHead, MaskHead, PoolSettings
from mrcnn.rpn import RPNHead
from mrcnn.rpn_targets import scatter_positive_deltas
from mrcnn.schema import Config

LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask")


class MaskRCNN(nn.Module):
    """The model from finished parts and the typed settings of its layers, each built by the `from_config` beside
    its class (`MaskRCNN.from_config` composes them).

    proposal_settings: the proposal layer (`mrcnn.proposals`); rpn_sample_settings: the RPN losses' anchor sample;
    target_settings: the detection-target layer; pool_settings: RoI pooling of both heads; detection_settings: the
    detection layer (replace it to evaluate at another threshold); loss_weights: one weight per LOSS_KEYS entry.
    anchors: [A, 4]; flip_perm: int64 [A] or None.
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
        proposal_settings: ProposalSettings,
        rpn_sample_settings: RPNSampleSettings,
        target_settings: DetectionTargetSettings,
        pool_settings: PoolSettings,
        detection_settings: DetectionSettings,
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
        self.proposal_settings = proposal_settings
        self.rpn_sample_settings = rpn_sample_settings
        self.target_settings = target_settings
        self.pool_settings = pool_settings
        self.detection_settings = detection_settings
        self.loss_weights = {key: float(loss_weights[key]) for key in LOSS_KEYS}

    @classmethod
    def from_config(cls, config: Config, num_classes: int) -> MaskRCNN:
        """A MaskRCNN for `config`, with `num_classes` classes including background (COCO: 81). Backbone weights are
        random (weights=None); load pretrained ones with `mrcnn.backbone.load_backbone_weights(model, path)`."""
        if config.mask.mask_size != 2 * config.roi.mask_pool_size:
            raise ValueError(f"mask.mask_size ({config.mask.mask_size}) must be 2 x roi.mask_pool_size "
                             f"({config.roi.mask_pool_size})")
        backbone = ResNetBackbone.from_config(config)
        try:
            flip_perm = flip_permutation_from_config(config)
        except ValueError:  # anchors not mirror-symmetric for this image size: no flip augmentation possible
            flip_perm = None
        return cls(
            backbone=backbone,
            fpn=FPN.from_config(config, backbone.out_channels),
            rpn_head=RPNHead.from_config(config),
            box_head=BoxHead.from_config(config, num_classes),
            mask_head=MaskHead.from_config(config, num_classes),
            anchors=anchors_from_config(config),
            flip_perm=flip_perm,
            pixel_mean=config.image.pixel_mean,
            pixel_std=config.image.pixel_std,
            proposal_settings=ProposalSettings.from_config(config),
            rpn_sample_settings=RPNSampleSettings.from_config(config),
            target_settings=DetectionTargetSettings.from_config(config),
            pool_settings=PoolSettings.from_config(config),
            detection_settings=DetectionSettings.from_config(config),
            loss_weights={key: getattr(config.train, key) for key in LOSS_KEYS},
        )

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
        return self.pool_settings.pool(pyramid, rois, output_size)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        pyramid, objectness, rpn_deltas = self.features(batch["images"])
        windows = batch["windows"]
        settings = self.proposal_settings
        if self.training:
            proposals, _ = settings.propose(objectness, rpn_deltas, self.anchors, windows,
                                            post_nms_topk=settings.post_nms_train)
            return self._losses(batch, pyramid, objectness, rpn_deltas, proposals)
        rois, _, image_idx = settings.propose_flat(objectness, rpn_deltas, self.anchors, windows,
                                                   post_nms_topk=settings.post_nms_test)
        return self._detections(pyramid, rois, image_idx, windows)

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
        loss_rpn_cls, loss_rpn_box = self.rpn_sample_settings.losses(objectness, rpn_deltas, batch["rpn_match"],
                                                                     rpn_targets)
        targets = self.target_settings.sample(
            proposals,
            gt_class_ids=batch["gt_class_ids"],
            gt_boxes=batch["gt_boxes"],
            gt_mini_masks=batch["gt_mini_masks"],
            crowd_boxes=batch["crowd_boxes"],
        )
        rois = targets.rois_with_index()  # [R, 5]
        class_logits, box_deltas = self.box_head(self.pool(pyramid, rois, self.pool_settings.pool_size))
        loss_cls, loss_box = box_losses(class_logits, box_deltas, targets.class_ids, targets.deltas)
        positive = targets.positive
        # [P, K, M, M]
        mask_logits = self.mask_head(self.pool(pyramid, rois[positive], self.pool_settings.mask_pool_size))
        loss_mask_value = mask_loss(mask_logits, targets.class_ids[positive], targets.masks)
        losses = dict(zip(LOSS_KEYS, (loss_rpn_cls, loss_rpn_box, loss_cls, loss_box, loss_mask_value), strict=True))
        return {key: value * self.loss_weights[key] for key, value in losses.items()}

    @torch.no_grad()
    def _detections(self, pyramid: list[Tensor], rois: Tensor, image_idx: Tensor,
                    windows: Tensor) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        """rois: [R, 4] proposals of all images, image_idx int64 [R] -> per-image detections (or, in ONNX export,
        the same padded to D = detection.max_detections: `mrcnn.detections.pad_per_image`)."""
        rois5 = torch.cat([image_idx.unsqueeze(1).to(rois.dtype), rois], dim=1)
        class_logits, box_deltas = self.box_head(self.pool(pyramid, rois5, self.pool_settings.pool_size))
        det = self.detection_settings.detect_flat(class_logits, box_deltas, rois, image_idx, windows)
        # The mask head sees the refined detection boxes, as at test time in the paper.
        det_rois = torch.cat([det["image_idx"].unsqueeze(1).to(det["boxes"].dtype), det["boxes"]], dim=1)
        # [T, K, M, M], T detections of all images
        mask_logits = self.mask_head(self.pool(pyramid, det_rois, self.pool_settings.mask_pool_size))
        class_ids = det["class_ids"]
        rows = torch.arange(class_ids.shape[0], device=rois.device)
        masks = torch.sigmoid(mask_logits[rows, class_ids].float())  # [T, M, M], the predicted class's
        columns = {"boxes": det["boxes"], "class_ids": class_ids, "scores": det["scores"], "masks": masks}
        num_images = windows.shape[0]
        if torch.onnx.is_in_onnx_export():  # a graph cannot return N lists of data-dependent length: padded, counted
            return pad_per_image(columns, det["image_idx"], num_images, self.detection_settings.max_detections)
        per_image = {name: split_by_image(values, det["image_idx"], num_images) for name, values in columns.items()}
        return [{name: per_image[name][i] for name in columns} for i in range(num_images)]


def build_model(config: Config, num_classes: int) -> MaskRCNN:
    """`MaskRCNN.from_config`: the model of `config` with `num_classes` classes including background."""
    return MaskRCNN.from_config(config, num_classes)

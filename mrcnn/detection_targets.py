"""Detection-target layer: sample the RoIs the box and mask heads train on, and their targets.

Per image, as in torchvision's RoIHeads: the ground-truth boxes are appended to the proposals (so every gt
box has at least one perfect RoI from the first step on), each candidate is matched to the gt box it overlaps
most, and `rois_per_image` candidates are sampled, at most `positive_fraction` of them positive:
- positive: IoU >= positive_iou with some gt box; target class, box deltas and a mask from that box;
- negative: IoU < positive_iou with every gt box and IoU < crowd_iou with every crowd box (a region marked
  iscrowd may hold unlabelled objects, so what touches it is never taught as background);
- the rest is never sampled. When positives run short, negatives fill the sample; when both do, fewer RoIs.

Glossary: N images, G gt slots per image (class id 0 = padding), C crowd slots (all-zero rows = padding),
R sampled RoIs over the batch, P of them positive. Boxes: (x1, y1, x2, y2) in padded-image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from mrcnn.box_coder import encode
from mrcnn.mini_masks import mask_targets, mini_mask_boxes
from mrcnn.schema import Config


@dataclass
class DetectionTargets:
    """Sampled RoIs of a batch, positives first within each image.

    rois: [R, 4] padded px; image_idx: int64 [R] (non-decreasing); class_ids: int64 [R] (0 = background);
    deltas: float32 [R, 4] (divided by the RoI bbox std; zero for negatives);
    masks: float32 [P, size, size] in [0, 1], the targets of the positives (class_ids > 0) in order.
    """

    rois: Tensor
    image_idx: Tensor
    class_ids: Tensor
    deltas: Tensor
    masks: Tensor

    @property
    def positive(self) -> Tensor:
        return self.class_ids > 0

    def rois_with_index(self) -> Tensor:
        """[R, 5] (image index, x1, y1, x2, y2): the box format of torchvision.ops.roi_align."""
        return torch.cat([self.image_idx.to(self.rois.dtype).unsqueeze(1), self.rois], dim=1)


def nonempty_boxes(boxes: Tensor) -> Tensor:
    """boxes: [M, 4] -> bool [M], True for boxes of positive width and height (padding rows are all zero)."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


@dataclass(frozen=True)
class DetectionTargetSettings:
    """The detection-target layer of a model: `sample_detection_targets`' settings (the roi section, the RPN's
    crowd IoU, the mask head's output size)."""

    rois_per_image: int
    positive_fraction: float
    positive_iou: float
    crowd_iou: float
    bbox_std: tuple[float, float, float, float]
    mask_size: int

    @classmethod
    def from_config(cls, config: Config) -> DetectionTargetSettings:
        roi = config.roi
        return cls(rois_per_image=roi.rois_per_image, positive_fraction=roi.positive_fraction,
                   positive_iou=roi.positive_iou, crowd_iou=config.rpn.crowd_iou, bbox_std=roi.bbox_std,
                   mask_size=config.mask.mask_size)

    def sample(self, proposals: list[Tensor], *, gt_class_ids: Tensor, gt_boxes: Tensor, gt_mini_masks: Tensor,
               crowd_boxes: Tensor, generator: torch.Generator | None = None) -> DetectionTargets:
        """`sample_detection_targets` with these settings (shapes there)."""
        return sample_detection_targets(
            proposals, gt_class_ids=gt_class_ids, gt_boxes=gt_boxes, gt_mini_masks=gt_mini_masks,
            crowd_boxes=crowd_boxes, rois_per_image=self.rois_per_image, positive_fraction=self.positive_fraction,
            positive_iou=self.positive_iou, crowd_iou=self.crowd_iou, bbox_std=self.bbox_std,
            mask_size=self.mask_size, generator=generator,
        )


@torch.no_grad()
def sample_detection_targets(
    proposals: list[Tensor],
    *,
    gt_class_ids: Tensor,
    gt_boxes: Tensor,
    gt_mini_masks: Tensor,
    crowd_boxes: Tensor,
    rois_per_image: int,
    positive_fraction: float,
    positive_iou: float,
    crowd_iou: float,
    bbox_std: tuple[float, float, float, float],
    mask_size: int,
    generator: torch.Generator | None = None,
) -> DetectionTargets:
    """Sample RoIs and their targets for a batch.

    proposals: N tensors [K_i, 4]; gt_class_ids: int64 [N, G]; gt_boxes: [N, G, 4]; gt_mini_masks: [N, G, m, m]
    (each covering `mini_mask_boxes(gt_box)`); crowd_boxes: [N, C, 4]. The loop is over images only (each has
    its own number of candidates); matching and sampling within an image are vectorised.
    """
    device = gt_boxes.device
    parts: list[tuple[Tensor, ...]] = []
    for i, image_proposals in enumerate(proposals):
        valid = gt_class_ids[i] > 0
        gt = gt_boxes[i][valid].float()  # [G_i, 4]
        classes = gt_class_ids[i][valid]
        crowd = crowd_boxes[i][nonempty_boxes(crowd_boxes[i])].float()
        candidates = torch.cat([image_proposals.float(), gt], dim=0)  # [K_i + G_i, 4]
        num = candidates.shape[0]

        if gt.shape[0] > 0:
            best_iou, match = box_iou(candidates, gt).max(dim=1)  # [K], [K]
        else:
            best_iou = candidates.new_zeros(num)
            match = torch.zeros(num, dtype=torch.int64, device=device)
        positive = best_iou >= positive_iou
        negative = ~positive
        if crowd.shape[0] > 0:
            negative &= box_iou(candidates, crowd).max(dim=1).values < crowd_iou

        pos_idx = torch.nonzero(positive).squeeze(1)
        neg_idx = torch.nonzero(negative).squeeze(1)
        num_pos = min(int(rois_per_image * positive_fraction), pos_idx.numel())
        num_neg = min(rois_per_image - num_pos, neg_idx.numel())
        pos_idx = pos_idx[torch.randperm(pos_idx.numel(), device=device, generator=generator)[:num_pos]]
        neg_idx = neg_idx[torch.randperm(neg_idx.numel(), device=device, generator=generator)[:num_neg]]

        pos_rois, neg_rois = candidates[pos_idx], candidates[neg_idx]
        pos_match = match[pos_idx]
        deltas = torch.zeros(num_pos + num_neg, 4, device=device)
        masks = torch.zeros(num_pos, mask_size, mask_size, device=device)
        if num_pos > 0:
            deltas[:num_pos] = encode(gt[pos_match], pos_rois, std=bbox_std)
            masks = mask_targets(
                gt_mini_masks[i][valid], mini_mask_boxes(gt), pos_rois, pos_match, size=mask_size
            ).float()
        class_ids = torch.cat([classes[pos_match], classes.new_zeros(num_neg)])
        rois = torch.cat([pos_rois, neg_rois])
        image_idx = torch.full((rois.shape[0],), i, dtype=torch.int64, device=device)
        parts.append((rois, image_idx, class_ids, deltas, masks))

    rois, image_idx, class_ids, deltas, masks = (torch.cat(p) for p in zip(*parts, strict=True))
    return DetectionTargets(rois=rois, image_idx=image_idx, class_ids=class_ids, deltas=deltas, masks=masks)

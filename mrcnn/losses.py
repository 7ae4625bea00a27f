"""The five Mask R-CNN losses, each a plain function computed in float32 (safe under bf16 autocast).

Normalisation follows torchvision / Detectron: box losses are smooth-L1 (beta = 1/9) summed over positives
and divided by the number of sampled anchors or RoIs, so positives and negatives weigh as in the sample.
Every loss is finite and zero-valued, but still attached to the graph, when it has nothing to learn from
(an image without instances, an empty RoI sample).

Anchor labels: 1 positive, 0 negative, -1 ignored. Glossary: N images, A anchors, R sampled RoIs, P positive
RoIs, K classes including background, M mask size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mrcnn.rpn_targets import sample_anchors
from mrcnn.schema import Config

SMOOTH_L1_BETA = 1.0 / 9.0


@dataclass(frozen=True)
class RPNSampleSettings:
    """The anchors the RPN losses sample a step: `num_samples` an image, at most `positive_fraction` positive."""

    num_samples: int
    positive_fraction: float

    @classmethod
    def from_config(cls, config: Config) -> RPNSampleSettings:
        return cls(num_samples=config.rpn.anchors_per_image, positive_fraction=config.rpn.positive_fraction)

    def losses(self, objectness: Tensor, pred_deltas: Tensor, rpn_match: Tensor,
               rpn_deltas: Tensor) -> tuple[Tensor, Tensor]:
        """`rpn_losses` on a sample of these settings (shapes there)."""
        return rpn_losses(objectness, pred_deltas, rpn_match, rpn_deltas, num_samples=self.num_samples,
                          positive_fraction=self.positive_fraction)


def rpn_losses(
    objectness: Tensor,
    pred_deltas: Tensor,
    rpn_match: Tensor,
    rpn_deltas: Tensor,
    *,
    num_samples: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss_rpn_cls, loss_rpn_box) on a fresh sample of anchors.

    objectness: [N, A] logits; pred_deltas: [N, A, 4]; rpn_match: int8 [N, A] (1 / 0 / -1);
    rpn_deltas: [N, A, 4] targets (zero except at positives). Cross-entropy (binary: object vs background)
    over the sampled anchors; smooth-L1 over the sampled positives, divided by the number sampled.
    """
    pos, neg = sample_anchors(
        rpn_match, num_samples=num_samples, positive_fraction=positive_fraction, generator=generator
    )
    sampled = pos | neg
    count = sampled.sum().clamp(min=1).float()
    logits = objectness.float()[sampled]
    loss_cls = F.binary_cross_entropy_with_logits(logits, pos[sampled].float(), reduction="sum") / count
    loss_box = (
        F.smooth_l1_loss(pred_deltas.float()[pos], rpn_deltas.float()[pos], beta=SMOOTH_L1_BETA, reduction="sum")
        / count
    )
    return loss_cls, loss_box


def box_losses(
    class_logits: Tensor, pred_deltas: Tensor, class_ids: Tensor, target_deltas: Tensor
) -> tuple[Tensor, Tensor]:
    """(loss_cls, loss_box) of the box head.

    class_logits: [R, K]; pred_deltas: [R, K, 4] class-specific; class_ids: int64 [R] (0 = background);
    target_deltas: [R, 4]. The box loss uses only each positive's own-class deltas.
    """
    if class_ids.numel() == 0:
        return class_logits.sum() * 0.0, pred_deltas.sum() * 0.0
    loss_cls = F.cross_entropy(class_logits.float(), class_ids)
    pos = torch.nonzero(class_ids > 0).squeeze(1)
    pred = pred_deltas[pos, class_ids[pos]].float()  # (R, K, 4) -> (P, 4): the gt class's deltas
    loss_box = F.smooth_l1_loss(pred, target_deltas[pos].float(), beta=SMOOTH_L1_BETA, reduction="sum")
    return loss_cls, loss_box / class_ids.numel()


def mask_loss(mask_logits: Tensor, class_ids: Tensor, targets: Tensor) -> Tensor:
    """Per-pixel binary cross-entropy on the gt class's mask only.

    mask_logits: [P, K, M, M]; class_ids: int64 [P] (all > 0); targets: [P, M, M] in [0, 1].
    """
    if class_ids.numel() == 0:
        return mask_logits.sum() * 0.0
    idx = torch.arange(class_ids.numel(), device=class_ids.device)
    logits = mask_logits[idx, class_ids].float()  # (P, K, M, M) -> (P, M, M)
    return F.binary_cross_entropy_with_logits(logits, targets.float())

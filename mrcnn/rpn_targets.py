"""RPN training targets: anchor labels and box deltas, and the per-step anchor sample.

Anchor labels: 1 positive, 0 negative, -1 ignored (neither; contributes no loss).
- positive: IoU >= positive_iou with some gt box, or among the best anchors of some gt box (every anchor tying
  that gt box's maximum IoU, when the maximum is > 0), so each gt box has at least one positive anchor;
- ignored: not positive, and negative_iou <= max IoU < positive_iou, or IoU >= crowd_iou with a crowd box
  (what overlaps a crowd region is never a negative);
- negative: every other anchor.
A positive's deltas go to the gt box it overlaps most (argmax IoU over gt, as matterport and torchvision do).

`compute_rpn_targets` runs once per image in preprocessing and stores the sparse form; `dense_rpn_targets`
rebuilds one image's [A] labels and deltas, `scatter_positive_deltas` a batch's deltas on the device (the loader
ships them sparse), and `sample_anchors` draws the 256-anchor sample on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from mrcnn.box_coder import encode
from mrcnn.schema import Config


class RPNTargets(NamedTuple):
    """Sparse RPN targets of one image.

    pos_idx: int64 [P] sorted anchor indices; pos_deltas: float32 [P, 4] (dx, dy, dw, dh) / std;
    ignore_idx: int64 [I] sorted anchor indices. Every other anchor is negative.
    """

    pos_idx: Tensor
    pos_deltas: Tensor
    ignore_idx: Tensor


# IoU is computed for this many anchors at a time so each [chunk, G] block stays in cache
_CHUNK = 4096


def _pairwise_iou(anchors: Tensor, boxes: Tensor, boxes_area: Tensor) -> Tensor:
    """IoU [A, B] of anchors [A, 4] with boxes [B, 4]; equal to torchvision.ops.box_iou (tested), about twice
    as fast on CPU because it works in place on [A, B] blocks instead of allocating [A, B, 2] intermediates."""
    iw = torch.minimum(anchors[:, None, 2], boxes[:, 2]) - torch.maximum(anchors[:, None, 0], boxes[:, 0])
    ih = torch.minimum(anchors[:, None, 3], boxes[:, 3]) - torch.maximum(anchors[:, None, 1], boxes[:, 1])
    inter = iw.clamp_(min=0).mul_(ih.clamp_(min=0))
    anchors_area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    union = (anchors_area[:, None] + boxes_area).sub_(inter)
    return inter.div_(union)


def _match(anchors: Tensor, boxes: Tensor, *, with_best: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per anchor the max IoU over `boxes` [B, 4] (B >= 1) and its argmax ([A] float, [A] int64), and with
    `with_best` a bool [A]: anchors tying some box's maximum IoU over all anchors, where that maximum is > 0."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    blocks, values, indices = [], [], []
    best = torch.zeros(boxes.shape[0], dtype=anchors.dtype, device=anchors.device)  # [B] max over anchors
    for start in range(0, anchors.shape[0], _CHUNK):
        iou = _pairwise_iou(anchors[start : start + _CHUNK], boxes, area)  # [chunk, B]
        v, i = iou.max(dim=1)
        values.append(v)
        indices.append(i)
        if with_best:
            blocks.append(iou)
            best = torch.maximum(best, iou.amax(dim=0))
    is_best = None
    if with_best:
        # a second pass once every box's maximum is known; ties all count (matterport's rule)
        is_best = torch.cat([((iou == best) & (best > 0)).any(dim=1) for iou in blocks])
    return torch.cat(values), torch.cat(indices), is_best


@dataclass(frozen=True)
class RPNTargetSettings:
    """The labelling of `compute_rpn_targets`: IoU thresholds and the RPN's bbox std (the rpn section)."""

    positive_iou: float
    negative_iou: float
    crowd_iou: float
    bbox_std: tuple[float, float, float, float]

    @classmethod
    def from_config(cls, config: Config) -> RPNTargetSettings:
        rpn = config.rpn
        return cls(positive_iou=rpn.positive_iou, negative_iou=rpn.negative_iou, crowd_iou=rpn.crowd_iou,
                   bbox_std=rpn.bbox_std)

    def compute(self, *, anchors: Tensor, gt_boxes: Tensor, crowd_boxes: Tensor) -> RPNTargets:
        """`compute_rpn_targets` with these settings (shapes there)."""
        return compute_rpn_targets(anchors=anchors, gt_boxes=gt_boxes, crowd_boxes=crowd_boxes,
                                   positive_iou=self.positive_iou, negative_iou=self.negative_iou,
                                   crowd_iou=self.crowd_iou, bbox_std=self.bbox_std)


def compute_rpn_targets(
    *,
    anchors: Tensor,
    gt_boxes: Tensor,
    crowd_boxes: Tensor,
    positive_iou: float,
    negative_iou: float,
    crowd_iou: float,
    bbox_std: Sequence[float],
) -> RPNTargets:
    """Sparse RPN targets of one image (see the module docstring for the rules).

    anchors: [A, 4]; gt_boxes: [G, 4] (G may be 0); crowd_boxes: [C, 4] (C may be 0); all (x1, y1, x2, y2) in
    padded-image pixels. Array-likes are accepted; computed in float32 on the anchors' device.
    """
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    device = anchors.device
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32, device=device).reshape(-1, 4)
    crowd_boxes = torch.as_tensor(crowd_boxes, dtype=torch.float32, device=device).reshape(-1, 4)
    num_anchors = anchors.shape[0]

    if gt_boxes.shape[0] > 0:
        max_iou, argmax, is_best = _match(anchors, gt_boxes, with_best=True)
        positive = (max_iou >= positive_iou) | is_best
        ignored = (max_iou >= negative_iou) & ~positive
    else:
        argmax = torch.zeros(num_anchors, dtype=torch.int64, device=device)
        positive = torch.zeros(num_anchors, dtype=torch.bool, device=device)
        ignored = torch.zeros(num_anchors, dtype=torch.bool, device=device)
    if crowd_boxes.shape[0] > 0:
        crowd_max, _, _ = _match(anchors, crowd_boxes, with_best=False)
        ignored |= (crowd_max >= crowd_iou) & ~positive

    pos_idx = positive.nonzero().flatten()
    pos_deltas = encode(gt_boxes[argmax[pos_idx]], anchors[pos_idx], std=bbox_std).to(torch.float32)
    return RPNTargets(pos_idx=pos_idx, pos_deltas=pos_deltas, ignore_idx=ignored.nonzero().flatten())


def _tensor(values, dtype: torch.dtype, device=None) -> Tensor:
    """A tensor of `values` (a tensor, a list, or a NumPy array, read-only ones included: those from Arrow are,
    and `torch.as_tensor` would warn that it cannot share them)."""
    if isinstance(values, Tensor):
        return values.to(device=device, dtype=dtype)
    return torch.tensor(np.asarray(values), dtype=dtype, device=device)


def dense_rpn_targets(
    num_anchors: int, pos_idx: Tensor, pos_deltas: Tensor, ignore_idx: Tensor
) -> tuple[Tensor, Tensor]:
    """Sparse -> dense: (match int8 [A] with 1 / 0 / -1, deltas float32 [A, 4] zero except at positives).

    Array-likes are accepted (e.g. the lists read from a shard row); output on pos_idx's device.
    """
    pos_idx = _tensor(pos_idx, torch.int64).reshape(-1)
    device = pos_idx.device
    ignore_idx = _tensor(ignore_idx, torch.int64, device).reshape(-1)
    pos_deltas = _tensor(pos_deltas, torch.float32, device).reshape(-1, 4)
    match = torch.zeros(num_anchors, dtype=torch.int8, device=device)
    match[ignore_idx] = -1
    match[pos_idx] = 1
    deltas = torch.zeros(num_anchors, 4, dtype=torch.float32, device=device)
    deltas[pos_idx] = pos_deltas
    return match, deltas


def scatter_positive_deltas(num_anchors: int, pos_idx: Tensor, pos_deltas: Tensor) -> Tensor:
    """The batched, padded sparse deltas -> dense deltas, on their device with no host sync.

    pos_idx: int [N, K] anchor indices, -1 = padding; pos_deltas: float [N, K, 4] (rows of padding ignored).
    Returns float32 [N, A, 4]: pos_deltas at pos_idx, zero elsewhere (what `dense_rpn_targets` gives per image).
    """
    n, k = pos_idx.shape
    # padding goes to a spare anchor slot A, dropped at the end: a scatter without boolean indexing (no sync)
    index = torch.where(pos_idx >= 0, pos_idx, num_anchors).to(torch.int64)
    dense = torch.zeros(n, num_anchors + 1, 4, dtype=torch.float32, device=pos_deltas.device)
    dense.scatter_(1, index.unsqueeze(-1).expand(n, k, 4), pos_deltas.float())
    return dense[:, :num_anchors]


def sample_anchors(
    match: Tensor,
    *,
    num_samples: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Per image, a random sample of at most `num_samples` labelled anchors.

    match: int [N, A] with 1 / 0 / -1. Per row, min(#positives, int(num_samples * positive_fraction)) positives
    drawn uniformly, then negatives fill the rest of num_samples (as many as there are). Returns
    (pos_mask [N, A] bool, neg_mask [N, A] bool). Batched on match's device: random scores ranked with topk, no
    loop over anchors or images. `generator` must live on match's device.
    """
    n, a = match.shape
    max_pos = int(num_samples * positive_fraction)
    is_pos = match == 1
    is_neg = match == 0
    scores = torch.rand(n, a, device=match.device, generator=generator)
    # unlabelled candidates score -1, below every random score in [0, 1)
    pos_mask = _take_top(torch.where(is_pos, scores, -1.0), is_pos.sum(1).clamp(max=max_pos))
    num_neg = (num_samples - pos_mask.sum(1)).clamp(min=0)
    neg_mask = _take_top(torch.where(is_neg, scores, -1.0), torch.minimum(num_neg, is_neg.sum(1)))
    return pos_mask, neg_mask


def _take_top(scores: Tensor, counts: Tensor) -> Tensor:
    """bool [N, A]: in each row the counts[row] highest-scoring entries (counts never exceed the valid ones)."""
    n, a = scores.shape
    k = int(min(a, int(counts.max()) if n else 0))
    mask = torch.zeros(n, a, dtype=torch.bool, device=scores.device)
    if k == 0:
        return mask
    top = scores.topk(k, dim=1).indices  # [N, k], highest first
    keep = torch.arange(k, device=scores.device)[None, :] < counts[:, None]  # [N, k]
    mask.scatter_(1, top, keep)
    return mask

"""Proposal layer: RPN outputs -> per-image proposal boxes.

Per image: the `pre_nms_topk` highest-scoring anchors over all levels, decoded with their deltas, clipped to
the image window (the unpadded region), boxes thinner than `min_size` dropped, NMS at `nms_threshold`,
then the best `post_nms_topk` kept. All images go through one batched NMS call (the image index is the NMS
group), so nothing loops over images or anchors in Python.

torchvision's (and Detectron's FPN) variant, given the anchors per level (`level_sizes`): `pre_nms_per_level`
takes the `pre_nms_topk` best of each level, and `nms_per_level` suppresses only within a level (the NMS group is
then (image, level)), ranking by the sigmoid probabilities as torchvision's `filter_proposals` does (logits that
differ can share one float32 probability near 1; the order among such ties is then torchvision's); the
`post_nms_topk` best of an image are still kept over all its levels.

Glossary: N images, A anchors, L levels, K candidates per image (min(pre_nms_topk, A), or the sum over the
levels of min(pre_nms_topk, A_l)). Boxes: (x1, y1, x2, y2) in padded-image pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from mrcnn.anchors import AnchorSettings, anchors_per_level
from mrcnn.box_coder import decode
from mrcnn.schema import Config


def clip_to_window(boxes: Tensor, windows: Tensor) -> Tensor:
    """boxes: [N, K, 4] (or [N, K, C, 4]), windows: [N, 4] (x1, y1, x2, y2) -> boxes clipped to each window."""
    shape = (windows.shape[0],) + (1,) * (boxes.dim() - 2) + (4,)
    win = windows.to(boxes.dtype).view(shape)
    low = torch.cat([win[..., :2], win[..., :2]], dim=-1)
    high = torch.cat([win[..., 2:], win[..., 2:]], dim=-1)
    return torch.minimum(torch.maximum(boxes, low), high)


def top_per_group(groups: Tensor, k: int, num_groups: int | None = None) -> Tensor:
    """Indices of the first `k` items of each group, for items already sorted by decreasing score.

    groups: int64 [M] in 0..num_groups-1 (e.g. image index per kept box, in score order; num_groups default
    max + 1) -> int64 [M'] indices into it, ordered by group, then by the original (score) order within a group.
    Written with a one-hot running count and a sort on unique keys (no bincount, no stable sort), so that it exports
    to ONNX as it runs here.
    """
    if num_groups is None:
        num_groups = int(groups.max()) + 1 if groups.numel() else 1
    # rank of each item within its group: the running count of its group's one-hot column, (M,) -> (M, G)
    onehot = (groups.unsqueeze(1) == torch.arange(num_groups, device=groups.device)).long()
    rank = onehot.cumsum(0).gather(1, groups.unsqueeze(1)).squeeze(1) - 1
    keep = torch.nonzero(rank < k).squeeze(1)
    # group first, then the original order: the key group * M + position is unique, so any sort is stable
    return keep[torch.argsort(groups[keep] * groups.shape[0] + keep)]


def split_by_image(values: Tensor, image_idx: Tensor, num_images: int) -> list[Tensor]:
    """values: [M, ...] grouped by image (image_idx [M] non-decreasing) -> N tensors, one per image."""
    counts = torch.bincount(image_idx, minlength=num_images).tolist()
    return list(torch.split(values, counts))


@torch.no_grad()
def flat_proposals(
    objectness: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    windows: Tensor,
    *,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_threshold: float,
    bbox_std: tuple[float, float, float, float],
    min_size: float,
    level_sizes: Sequence[int] | None = None,
    pre_nms_per_level: bool = False,
    nms_per_level: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """Proposals for each image.

    objectness: [N, A] logits; deltas: [N, A, 4] (divided by `bbox_std`); anchors: [A, 4] padded pixels;
    windows: [N, 4] (x1, y1, x2, y2), the unpadded region of each image. level_sizes: anchors per level, in anchor
    order (sum A), needed by `pre_nms_per_level` and `nms_per_level`.
    Returns (boxes, scores, image_idx) of all images together, grouped by image: [P, 4] padded pixels, [P]
    objectness probabilities by decreasing score within an image, int64 [P] image index; at most post_nms_topk
    of an image (`generate_proposals` splits them per image).

    Proposals are detached (no_grad): the paper's approximate joint training ignores the gradient through
    the proposal coordinates; the RPN learns from its own losses only.
    """
    num_images, num_anchors = objectness.shape
    if (pre_nms_per_level or nms_per_level) and (level_sizes is None or sum(level_sizes) != num_anchors):
        raise ValueError(f"per-level proposals need the anchors per level summing to {num_anchors}, got {level_sizes}")
    # Box coding in float32, also under bf16 autocast: exp() of the size deltas needs the range.
    objectness, deltas = objectness.float(), deltas.float()
    if pre_nms_per_level:
        # each level's best, level by level: (N, A_l) -> (N, K_l), concatenated to (N, K)
        parts, first = [], 0
        for size in level_sizes:
            parts.append(objectness[:, first : first + size].topk(min(pre_nms_topk, size), dim=1)[1] + first)
            first += size
        idx = torch.cat(parts, dim=1)
        scores = torch.gather(objectness, 1, idx)
    else:
        scores, idx = objectness.topk(min(pre_nms_topk, num_anchors), dim=1)  # [N, K], best first
    k = idx.shape[1]
    # (N, A, 4) -> (N, K, 4): the deltas of the chosen anchors
    top_deltas = torch.gather(deltas, 1, idx.unsqueeze(-1).expand(-1, -1, 4))
    top_anchors = anchors.to(deltas.dtype)[idx]  # [N, K, 4]
    # (N, K, 4) -> (N*K, 4) for the coder, and back
    boxes = decode(top_deltas.reshape(-1, 4), top_anchors.reshape(-1, 4), std=bbox_std).view(num_images, k, 4)
    boxes = clip_to_window(boxes, windows)
    sizes = boxes[..., 2:] - boxes[..., :2]
    valid = (sizes >= min_size).all(dim=-1)  # [N, K]
    image_idx = torch.arange(num_images, device=boxes.device).unsqueeze(1).expand(num_images, k)
    groups = image_idx
    if nms_per_level:  # (image, level) groups: level of anchor a, gathered like the scores
        anchor_level = torch.repeat_interleave(torch.arange(len(level_sizes), device=boxes.device),
                                               torch.as_tensor(list(level_sizes), device=boxes.device))
        groups = image_idx * len(level_sizes) + anchor_level[idx]
    boxes, scores, image_idx, groups = boxes[valid], scores[valid], image_idx[valid], groups[valid]  # [M, 4], [M] x 3
    # The image index as NMS group: one call suppresses within each image only (within each of its levels with
    # nms_per_level); `keep` is in score order.
    keep = batched_nms(boxes, torch.sigmoid(scores) if nms_per_level else scores, groups, nms_threshold)
    keep = keep[top_per_group(image_idx[keep], post_nms_topk, num_images)]  # grouped by image, best first in each
    return boxes[keep], torch.sigmoid(scores[keep]), image_idx[keep]


def generate_proposals(objectness: Tensor, deltas: Tensor, anchors: Tensor, windows: Tensor,
                       **settings) -> tuple[list[Tensor], list[Tensor]]:
    """`flat_proposals` (arguments there) split per image: (boxes, scores), N tensors [P_i, 4] padded pixels and
    [P_i] objectness probabilities, sorted by decreasing score, P_i <= post_nms_topk."""
    boxes, scores, image_idx = flat_proposals(objectness, deltas, anchors, windows, **settings)
    num_images = objectness.shape[0]
    return split_by_image(boxes, image_idx, num_images), split_by_image(scores, image_idx, num_images)


@dataclass(frozen=True)
class ProposalSettings:
    """The proposal layer of a model: `generate_proposals`' settings, and how many proposals an image keeps in
    training (`post_nms_train`) and in evaluation (`post_nms_test`). level_sizes: anchors per level, P2 first."""

    pre_nms_topk: int
    nms_threshold: float
    bbox_std: tuple[float, float, float, float]
    min_size: float
    level_sizes: tuple[int, ...]
    pre_nms_per_level: bool
    nms_per_level: bool
    post_nms_train: int
    post_nms_test: int

    @classmethod
    def from_config(cls, config: Config) -> ProposalSettings:
        rpn = config.rpn
        return cls(pre_nms_topk=rpn.pre_nms_topk, nms_threshold=rpn.nms_threshold, bbox_std=rpn.bbox_std,
                   min_size=rpn.min_size, level_sizes=tuple(anchors_per_level(AnchorSettings.from_config(config))),
                   pre_nms_per_level=rpn.pre_nms_per_level, nms_per_level=rpn.nms_per_level,
                   post_nms_train=rpn.post_nms_train, post_nms_test=rpn.post_nms_test)

    def propose(self, objectness: Tensor, deltas: Tensor, anchors: Tensor, windows: Tensor, *,
                post_nms_topk: int) -> tuple[list[Tensor], list[Tensor]]:
        """`generate_proposals` with these settings (shapes there)."""
        return generate_proposals(objectness, deltas, anchors, windows, **self._settings(post_nms_topk))

    def propose_flat(self, objectness: Tensor, deltas: Tensor, anchors: Tensor, windows: Tensor, *,
                     post_nms_topk: int) -> tuple[Tensor, Tensor, Tensor]:
        """`flat_proposals` with these settings (shapes there)."""
        return flat_proposals(objectness, deltas, anchors, windows, **self._settings(post_nms_topk))

    def _settings(self, post_nms_topk: int) -> dict:
        return dict(pre_nms_topk=self.pre_nms_topk, post_nms_topk=post_nms_topk, nms_threshold=self.nms_threshold,
                    bbox_std=self.bbox_std, min_size=self.min_size, level_sizes=self.level_sizes,
                    pre_nms_per_level=self.pre_nms_per_level, nms_per_level=self.nms_per_level)

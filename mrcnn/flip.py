"""Horizontal flip of training images together with every target, precomputed RPN targets included.

The whole padded S x S canvas is mirrored (x -> S - x), not just the image window: that is the map under which
the anchor set is symmetric (anchors.flip_permutation), so anchor i of the flipped image is the mirror of anchor
flip_perm[i] of the original and inherits its label, with dx negated (dy, dw, dh are unchanged by a mirror).
A flipped image's window therefore moves to the right edge: (S - x2, y1, S - x1, y2).

Batch keys (docs/design.md, "The training batch"; missing keys are skipped, unknown keys passed through):
images uint8 [N, 3, S, S]; windows int64 [N, 4]; gt_class_ids int64 [N, G] (0 = padding);
gt_boxes float32 [N, G, 4]; gt_mini_masks uint8 [N, G, m, m]; crowd_boxes float32 [N, C, 4] (zero rows = padding);
rpn_match int8 [N, A]; rpn_deltas float32 [N, A, 4]. Boxes are (x1, y1, x2, y2) in padded-image pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _mirror_boxes(boxes: Tensor, size: int) -> Tensor:
    """[..., 4] (x1, y1, x2, y2) -> (size - x2, y1, size - x1, y2)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([size - x2, y1, size - x1, y2], dim=-1)


def flip_batch(batch: dict, *, flip_perm: Tensor, which: Tensor) -> dict:
    """Mirror the images chosen by `which` (bool [N]) and all their targets; returns a new dict.

    flip_perm: int64 [A] from anchors.flip_permutation for the batch's anchor set. Padding rows of gt_boxes
    (gt_class_ids == 0) and crowd_boxes (all zero) stay zero. The input dict and its tensors are not modified.
    """
    out = dict(batch)
    images = batch["images"]
    size = images.shape[-1]
    device = images.device
    which = torch.as_tensor(which, dtype=torch.bool)
    if which.device.type == "cpu" and not which.any():  # read where it is free: a device tensor would be a sync
        return out
    which = which.to(device, non_blocking=True)
    per_image = which.view(-1, 1)  # [N, 1], broadcast against per-image rows

    out["images"] = torch.where(which.view(-1, 1, 1, 1), images.flip(-1), images)
    if "windows" in batch:
        windows = batch["windows"]
        out["windows"] = torch.where(per_image, _mirror_boxes(windows, size).to(windows.dtype), windows)
    if "gt_boxes" in batch:
        boxes = batch["gt_boxes"]
        if "gt_class_ids" in batch:
            real = batch["gt_class_ids"] > 0
        else:
            real = (boxes != 0).any(-1)
        chosen = (per_image & real)[..., None]  # [N, G, 1]
        out["gt_boxes"] = torch.where(chosen, _mirror_boxes(boxes, size), boxes)
    if "crowd_boxes" in batch:
        crowd = batch["crowd_boxes"]
        chosen = (per_image & (crowd != 0).any(-1))[..., None]  # [N, C, 1]
        out["crowd_boxes"] = torch.where(chosen, _mirror_boxes(crowd, size), crowd)
    if "gt_mini_masks" in batch:
        # a mini box mirrors onto the mini box of the mirrored gt box (S is an integer), so flipping the
        # mini-mask's columns is all it takes
        masks = batch["gt_mini_masks"]
        out["gt_mini_masks"] = torch.where(which.view(-1, 1, 1, 1), masks.flip(-1), masks)
    if "rpn_match" in batch or "rpn_deltas" in batch:
        perm = flip_perm.to(device=device, dtype=torch.int64)
        if "rpn_match" in batch:
            match = batch["rpn_match"]
            out["rpn_match"] = torch.where(per_image, match[:, perm], match)
        if "rpn_deltas" in batch:
            deltas = batch["rpn_deltas"]
            sign = deltas.new_tensor([-1.0, 1.0, 1.0, 1.0])
            out["rpn_deltas"] = torch.where(which.view(-1, 1, 1), deltas[:, perm] * sign, deltas)
    return out

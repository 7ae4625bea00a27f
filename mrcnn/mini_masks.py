"""Mini-masks: each instance mask stored as a small square bitmap of its integer enclosing box.

A mini-mask of size s covers its mini box (x1, y1, x2, y2) (integer, padded-image pixels): mini pixel (u, v)
covers [x1 + u * w / s, x1 + (u + 1) * w / s) horizontally, w = x2 - x1, and likewise vertically. So a point
x in the image frame sits at u = (x - x1) * s / w in the mini-mask frame; every function here uses that map.

- `mini_mask_boxes`: gt boxes -> integer enclosing boxes (floor / ceil, at least 1 px).
- `minimize_masks`: full masks -> mini-masks (roi_align, aligned=True, threshold 0.5).
- `expand_masks` / `paste_masks`: mini-masks (or predicted masks) -> full image (bilinear, zero outside).
- `pack_masks` / `unpack_masks`: the bit-packed bytes stored in shards (np.packbits, C order).
- `mask_targets`: mask-head targets cut from the mini-masks for RoIs given in padded-image pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

# masks converted to float this many at a time: a full-resolution [N, H, W] float copy can be large
_CHUNK = 16


def mini_mask_boxes(gt_boxes: Tensor) -> Tensor:
    """[N, 4] (x1, y1, x2, y2) -> [N, 4] (floor(x1), floor(y1), ceil(x2), ceil(y2)), at least one pixel wide and
    high, in the input's float dtype (float32 for array-likes)."""
    boxes = torch.as_tensor(gt_boxes)
    if not boxes.is_floating_point():
        boxes = boxes.to(torch.float32)
    boxes = boxes.reshape(-1, 4)
    x1, y1 = boxes[:, 0].floor(), boxes[:, 1].floor()
    x2 = torch.maximum(boxes[:, 2].ceil(), x1 + 1)
    y2 = torch.maximum(boxes[:, 3].ceil(), y1 + 1)
    return torch.stack([x1, y1, x2, y2], dim=1)


def _rois(boxes: Tensor, batch_index: Tensor) -> Tensor:
    """[R, 4] boxes + [R] image index -> [R, 5] (index, x1, y1, x2, y2), roi_align's format."""
    return torch.cat([batch_index.to(boxes.dtype)[:, None], boxes], dim=1)


def minimize_masks(masks: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop-and-resize each mask to its box.

    masks: [N, H, W] bool / uint8 (array-like accepted); boxes: [N, 4] (x1, y1, x2, y2) in the masks' pixel frame
    (for shards: the mini box divided by the image scale, so the ORIGINAL-resolution mask is sampled).
    Returns bool [N, size, size]: roi_align(aligned=True) average of each bin >= 0.5.
    """
    masks = torch.as_tensor(masks)
    boxes = torch.as_tensor(boxes, dtype=torch.float32, device=masks.device).reshape(-1, 4)
    out = torch.zeros(masks.shape[0], size, size, dtype=torch.bool, device=masks.device)
    height, width = masks.shape[-2:]
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        # Only the pixels the box's samples can read are made float: aligned samples lie in (x1 - 0.5, x2 - 0.5), and
        # bilinear reads floor(x) and floor(x) + 1, so one pixel beyond floor / ceil is enough. Where the crop meets
        # the mask's edge, roi_align clamps as it would on the whole mask; inside, nothing it reads is cut off.
        cx1, cy1 = max(math.floor(x1) - 1, 0), max(math.floor(y1) - 1, 0)
        cx2, cy2 = min(math.ceil(x2) + 1, width), min(math.ceil(y2) + 1, height)
        if cx2 <= cx1 or cy2 <= cy1:
            continue  # the box misses the mask: roi_align would sample zeros (or clamp to an edge of zeros)
        crop = masks[i, cy1:cy2, cx1:cx2].to(torch.float32)[None, None]  # [1, 1, h, w]
        roi = torch.tensor([[0.0, x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1]], device=masks.device)
        sampled = roi_align(crop, roi, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out[i] = sampled[0, 0] >= 0.5
    return out


def _interp_weights(lo: Tensor, hi: Tensor, size: int, length: int) -> Tensor:
    """[N, length, size] bilinear weights taking a size-cell grid spanning [lo, hi] to `length` pixel centres,
    with zeros beyond the grid (so nothing leaks further than half a cell outside the box)."""
    centres = torch.arange(length, device=lo.device, dtype=lo.dtype) + 0.5  # [L]
    scale = size / (hi - lo).clamp(min=1e-6)  # [N]
    u = (centres[None, :] - lo[:, None]) * scale[:, None] - 0.5  # [N, L] position in cell-centre units
    cells = torch.arange(size, device=lo.device, dtype=lo.dtype)  # [s]
    return (1 - (u[:, :, None] - cells).abs()).clamp(min=0)  # [N, L, s]


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """Paste square masks into the image: float [N, height, width].

    masks: [N, s, s] values in [0, 1] (mini-masks or the mask head's probabilities); boxes: [N, 4] (x1, y1, x2, y2)
    in the target frame (any float values). Bilinear resampling of the mask over its box, zero outside.
    """
    masks = torch.as_tensor(masks).to(torch.float32)
    boxes = torch.as_tensor(boxes, dtype=torch.float32, device=masks.device).reshape(-1, 4)
    size = masks.shape[-1]
    out = torch.zeros(masks.shape[0], height, width, dtype=torch.float32, device=masks.device)
    for start in range(0, masks.shape[0], _CHUNK):
        b = boxes[start : start + _CHUNK]
        wy = _interp_weights(b[:, 1], b[:, 3], size, height)  # [n, H, s]
        wx = _interp_weights(b[:, 0], b[:, 2], size, width)  # [n, W, s]
        # separable bilinear: [n, H, s] @ [n, s, s] @ [n, s, W]
        out[start : start + b.shape[0]] = wy @ masks[start : start + _CHUNK] @ wx.transpose(1, 2)
    return out


def expand_masks(mini: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """Mini-masks back to full masks: bool [N, height, width] = paste_masks(...) >= 0.5.

    mini: [N, s, s] bool / uint8; boxes: [N, 4] mini boxes (x1, y1, x2, y2) in the target frame.
    """
    return paste_masks(mini, boxes, height, width) >= 0.5


def pack_masks(mini: np.ndarray | Tensor) -> bytes:
    """[N, s, s] masks (any dtype: non-zero is set) -> bytes: np.packbits of the C-order flattened bools
    (zero-padded to a whole byte)."""
    if isinstance(mini, Tensor):
        mini = mini.detach().cpu().numpy()
    return np.packbits(np.asarray(mini, dtype=bool), axis=None).tobytes()


def unpack_masks(data: bytes, count: int, size: int) -> np.ndarray:
    """Inverse of `pack_masks`: bool ndarray [count, size, size]."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * size * size)
    return bits.reshape(count, size, size).astype(bool)


def mask_targets(mini: Tensor, mini_boxes: Tensor, rois: Tensor, gt_index: Tensor, *, size: int) -> Tensor:
    """Mask-head targets: each RoI's gt mask resampled to [size, size], float in [0, 1] (not thresholded).

    mini: [G, s, s] bool / uint8 / float mini-masks; mini_boxes: [G, 4] their boxes; rois: [R, 4]; both
    (x1, y1, x2, y2) in padded-image pixels; gt_index: int64 [R], the gt instance of each RoI.
    Each RoI is expressed in its gt mini-mask's frame and sampled with roi_align(aligned=True); outside the
    mini box the mask is zero (a one-cell zero border is added so bilinear samples there fade out correctly).
    """
    rois = rois.to(torch.float32)
    if rois.shape[0] == 0:
        return torch.zeros(0, size, size, dtype=torch.float32, device=rois.device)
    s = mini.shape[-1]
    padded = F.pad(mini.to(device=rois.device, dtype=torch.float32), (1, 1, 1, 1))[:, None]  # [G, 1, s+2, s+2]
    box = mini_boxes.to(rois)[gt_index]  # [R, 4]
    origin = box[:, :2].repeat(1, 2)  # (x1, y1, x1, y1)
    cell = ((box[:, 2:] - box[:, :2]) / s).repeat(1, 2)  # image pixels per mini cell, (w, h, w, h)
    local = (rois - origin) / cell + 1  # +1: the zero border
    sampled = roi_align(
        padded, _rois(local, gt_index), output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
    )
    return sampled[:, 0]

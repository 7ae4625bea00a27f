"""Box deltas (dx, dy, dw, dh) between boxes and reference boxes (anchors or proposals).

    dx = (gx - rx) / rw / std_x      dw = log(gw / rw) / std_w      (x, y: centres; w, h: x2 - x1, y2 - y1)

With std (0.1, 0.1, 0.2, 0.2) this is torchvision's `BoxCoder(weights=(10, 10, 5, 5))` (weights = 1 / std).
Boxes are (x1, y1, x2, y2); both functions work on any device and dtype of their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# dw, dh clamped at log(1000 / 16) so exp() cannot overflow on a wild prediction (torchvision's bbox_xform_clip)
DELTA_CLAMP = math.log(1000.0 / 16)


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(boxes: Tensor, reference: Tensor, *, std: Sequence[float]) -> Tensor:
    """Deltas that take `reference` onto `boxes`.

    boxes, reference: [N, 4] (x1, y1, x2, y2) in the same frame; returns deltas [N, 4] (dx, dy, dw, dh) / std.
    Boxes and references must have positive width and height (log of a ratio).
    """
    gx, gy, gw, gh = _centre_size(boxes)
    rx, ry, rw, rh = _centre_size(reference)
    deltas = torch.stack([(gx - rx) / rw, (gy - ry) / rh, torch.log(gw / rw), torch.log(gh / rh)], dim=-1)
    return deltas / deltas.new_tensor(std)


def decode(deltas: Tensor, reference: Tensor, *, std: Sequence[float]) -> Tensor:
    """Boxes obtained by applying `deltas` to `reference`; the inverse of `encode`.

    deltas: [N, 4] or [N, K, 4] (dx, dy, dw, dh) / std (e.g. K class-specific deltas per RoI);
    reference: [N, 4] (x1, y1, x2, y2), broadcast over K. Returns boxes shaped like `deltas`.
    """
    while reference.dim() < deltas.dim():
        reference = reference.unsqueeze(-2)  # [N, 4] -> [N, 1, 4]
    d = deltas * deltas.new_tensor(std)
    dw = d[..., 2].clamp(max=DELTA_CLAMP)
    dh = d[..., 3].clamp(max=DELTA_CLAMP)
    rx, ry, rw, rh = _centre_size(reference.to(deltas.dtype))
    cx = rx + d[..., 0] * rw
    cy = ry + d[..., 1] * rh
    half_w = 0.5 * rw * torch.exp(dw)
    half_h = 0.5 * rh * torch.exp(dh)
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)

"""Resize-and-pad geometry: original image pixels <-> padded network-input pixels.

Each image is resized keeping its aspect ratio (short side towards `min_dim`, long side at most `max_dim`) and
placed at the TOP-LEFT of a `max_dim x max_dim` zero canvas (docs/design.md, "Geometry"). So

    padded = original * scale + (window x1, window y1)        (the offset is (0, 0) for this layout)

Boxes are (x1, y1, x2, y2), pixel i covers [i, i + 1). `resize_image` is the one resize of the pipeline's
pixels: the loader, evaluation, inspection and predict all call it, so an image's pixels do not depend on the path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Geometry(NamedTuple):
    """How one image sits in the padded input.

    scale: original -> resized factor; new_h, new_w: resized size in pixels;
    window: (x1, y1, x2, y2) of the resized image inside the padded canvas.
    """

    scale: float
    new_h: int
    new_w: int
    window: tuple[int, int, int, int]


def resize_geometry(height: int, width: int, *, min_dim: int, max_dim: int) -> Geometry:
    """Geometry of an original `height x width` image in the `max_dim x max_dim` input.

    scale = min_dim / min(h, w), unless that makes the long side round above max_dim, then max_dim / max(h, w).
    Example: 480 high x 640 wide at (800, 1024) -> scale 1.6, 768 x 1024, window (0, 0, 1024, 768).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = min_dim / min(height, width)
    if round(max(height, width) * scale) > max_dim:
        scale = max_dim / max(height, width)
    new_h = round(height * scale)
    new_w = round(width * scale)
    return Geometry(scale=float(scale), new_h=new_h, new_w=new_w, window=(0, 0, new_w, new_h))


def boxes_to_original(boxes: Tensor, *, scale: float, window: tuple[int, int, int, int] | Tensor) -> Tensor:
    """Padded-image boxes -> original-image boxes.

    boxes: [N, 4] (x1, y1, x2, y2) in padded-image pixels; returns [N, 4] in original-image pixels
    (not clipped: callers that want boxes inside the image clip to (0, 0, width, height)).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    window = torch.as_tensor(window, dtype=boxes.dtype, device=boxes.device)
    shift = torch.stack([window[0], window[1], window[0], window[1]])
    return (boxes - shift) / float(scale)


def coco_bbox_to_box(bbox_xywh: Tensor, scale: float) -> Tensor:
    """COCO [x, y, w, h] in original pixels -> (x1, y1, x2, y2) in padded pixels.

    bbox_xywh: [N, 4] (array-like accepted); returns float32 [N, 4] = (x, y, x + w, y + h) * scale.
    """
    xywh = torch.as_tensor(bbox_xywh, dtype=torch.float32).reshape(-1, 4)
    x, y, w, h = xywh.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1) * float(scale)


def resize_image(image: Tensor, new_h: int, new_w: int) -> Tensor:
    """Bilinear resize with antialiasing (PIL's BILINEAR filter when shrinking), on the image's device.

    image: uint8 [3, H, W] or [N, 3, H, W]; returns uint8 [3, new_h, new_w] (or [N, 3, new_h, new_w]), the input
    itself when the size is already right. On CPU torch's uint8 kernel; on CUDA, which has none, in float32,
    rounded and clamped: the two agree to within 1 grey level (tests/mrcnn/test_geometry.py, tests/gpu).
    """
    if image.dtype != torch.uint8 or image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"resize_image takes uint8 [3, H, W] or [N, 3, H, W], got {image.dtype} {list(image.shape)}")
    if new_h <= 0 or new_w <= 0:
        raise ValueError(f"resize_image: size must be positive, got {new_h}x{new_w}")
    if tuple(image.shape[-2:]) == (new_h, new_w):
        return image
    batch = image if image.dim() == 4 else image[None]  # [N, 3, H, W]
    if batch.device.type == "cpu":
        out = F.interpolate(batch, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    else:
        out = _resize_float(batch, new_h, new_w)
    return out if image.dim() == 4 else out[0]


def _resize_float(batch: Tensor, new_h: int, new_w: int) -> Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, new_h, new_w] through float32 (the CUDA path; tested on CPU)."""
    out = F.interpolate(batch.float(), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)

"""Anchor boxes for the FPN levels, and their left-right mirror permutation.

Order (docs/design.md, "Geometry"): level by level (P2 first), then row i, then column j, then ratio in config order.
On a level of feature stride f, with d = anchor_stride * f, there are n = ceil(image_size / d) positions per side
and anchor centres sit at ((j + offset) * d, (i + offset) * d), offset 0.5 by default (torchvision's: 0). An anchor
of scale s and ratio r (= width / height) is w = s * sqrt(r), h = s / sqrt(r); with `round_sizes` its half-width and
half-height are rounded to whole pixels (torchvision's base anchors). Anchors are (x1, y1, x2, y2) float32 in
padded-image pixels.

When d divides image_size and offset is 0.5 the set is mirror-symmetric under x -> image_size - x: column j maps to
column n - 1 - j with the same row, level and ratio, which is what `flip_permutation` returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _positions(image_size: int, feature_stride: int, anchor_stride: int) -> int:
    return math.ceil(image_size / (feature_stride * anchor_stride))


def _check(scales: Sequence[float], feature_strides: Sequence[int]) -> None:
    if len(scales) != len(feature_strides):
        raise ValueError(f"one anchor scale per level: {len(scales)} scales for {len(feature_strides)} strides")


def anchors_per_level(
    *,
    image_size: int,
    scales: Sequence[float],
    feature_strides: Sequence[int],
    ratios: Sequence[float],
    anchor_stride: int,
) -> list[int]:
    """Number of anchors on each level, P2 first: n_l ** 2 * len(ratios)."""
    _check(scales, feature_strides)
    return [_positions(image_size, f, anchor_stride) ** 2 * len(ratios) for f in feature_strides]


def generate_anchors(
    *,
    image_size: int,
    scales: Sequence[float],
    feature_strides: Sequence[int],
    ratios: Sequence[float],
    anchor_stride: int,
    offset: float = 0.5,
    round_sizes: bool = False,
) -> Tensor:
    """All anchors of a square `image_size` input: float32 [A, 4] (x1, y1, x2, y2) in padded-image pixels.

    offset: centres at (j + offset) * d; round_sizes: half-sizes rounded to whole pixels (half to even).
    """
    _check(scales, feature_strides)
    levels = []
    for scale, stride in zip(scales, feature_strides, strict=True):
        n = _positions(image_size, stride, anchor_stride)
        step = anchor_stride * stride
        # float64 while building so mirrored anchors agree to float32 rounding
        centres = (torch.arange(n, dtype=torch.float64) + offset) * step  # [n]
        r = torch.tensor(ratios, dtype=torch.float64)
        half_w = scale * r.sqrt() / 2  # [R]
        half_h = scale / r.sqrt() / 2  # [R]
        if round_sizes:
            half_w, half_h = half_w.round(), half_h.round()
        cy = centres[:, None, None]  # [n, 1, 1] row i
        cx = centres[None, :, None]  # [1, n, 1] column j
        shape = (n, n, len(ratios))
        boxes = torch.stack(
            [
                (cx - half_w).expand(shape),
                (cy - half_h).expand(shape),
                (cx + half_w).expand(shape),
                (cy + half_h).expand(shape),
            ],
            dim=-1,
        )  # [n (row), n (column), R, 4]
        levels.append(boxes.reshape(-1, 4))
    return torch.cat(levels).to(torch.float32)


def flip_permutation(
    *,
    image_size: int,
    scales: Sequence[float],
    feature_strides: Sequence[int],
    ratios: Sequence[float],
    anchor_stride: int,
    offset: float = 0.5,
    round_sizes: bool = False,
) -> Tensor:
    """int64 [A]: index of each anchor's mirror image under x -> image_size - x (an involution).

    Raises ValueError when anchor_stride * feature_stride does not divide image_size on some level, or when the
    centres are not in the middle of their cells (offset != 0.5): the centres are then not mirror-symmetric and no
    such permutation exists. Rounded sizes keep the symmetry (rounding is the same on both sides).
    """
    _check(scales, feature_strides)
    if offset != 0.5:
        raise ValueError(f"anchors are not mirror-symmetric: centres at (j + {offset}) * stride, not at "
                         "(j + 0.5) * stride")
    perms = []
    offset = 0
    for stride in feature_strides:
        step = anchor_stride * stride
        if image_size % step:
            raise ValueError(f"anchors are not mirror-symmetric: {image_size=} is not a multiple of {step}")
        n = image_size // step
        idx = torch.arange(n * n * len(ratios)).reshape(n, n, len(ratios))  # [row, column, ratio]
        perms.append(idx.flip(1).reshape(-1) + offset)  # column j <-> n - 1 - j
        offset += idx.numel()
    return torch.cat(perms)


def _config_kwargs(config) -> dict:
    rpn = config.rpn
    return {
        "image_size": config.image.max_dim,
        "scales": rpn.anchor_scales,
        "feature_strides": rpn.feature_strides,
        "ratios": rpn.anchor_ratios,
        "anchor_stride": rpn.anchor_stride,
        "offset": rpn.anchor_offset,
        "round_sizes": rpn.round_anchors,
    }


def anchors_from_config(config) -> Tensor:
    """`generate_anchors` for a `mrcnn.config.Config` (image.max_dim and the rpn section)."""
    return generate_anchors(**_config_kwargs(config))


def flip_permutation_from_config(config) -> Tensor:
    """`flip_permutation` for a `mrcnn.config.Config`."""
    return flip_permutation(**_config_kwargs(config))

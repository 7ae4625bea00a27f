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
from dataclasses import dataclass

import torch
from torch import Tensor

from mrcnn.schema import Config


def _positions(image_size: int, feature_stride: int, anchor_stride: int) -> int:
    return math.ceil(image_size / (feature_stride * anchor_stride))


def _check(scales: Sequence[float], feature_strides: Sequence[int]) -> None:
    if len(scales) != len(feature_strides):
        raise ValueError(f"one anchor scale per level: {len(scales)} scales for {len(feature_strides)} strides")


@dataclass(frozen=True)
class AnchorSettings:
    """An anchor set: a square `image_size` input (image.max_dim), one scale (px) per level of feature stride
    `feature_strides` (P2 first), the `ratios` (width / height) at each position, positions on every
    `anchor_stride`-th feature cell, centres at (j + `offset`) * d, half-sizes rounded to whole pixels with
    `round_sizes`."""

    image_size: int
    scales: tuple[float, ...]
    feature_strides: tuple[int, ...]
    ratios: tuple[float, ...]
    anchor_stride: int
    offset: float
    round_sizes: bool

    @classmethod
    def from_config(cls, config: Config) -> AnchorSettings:
        rpn = config.rpn
        return cls(image_size=config.image.max_dim, scales=tuple(rpn.anchor_scales),
                   feature_strides=tuple(rpn.feature_strides), ratios=tuple(rpn.anchor_ratios),
                   anchor_stride=rpn.anchor_stride, offset=rpn.anchor_offset, round_sizes=rpn.round_anchors)


def anchors_per_level(anchors: AnchorSettings) -> list[int]:
    """Number of anchors on each level, P2 first: n_l ** 2 * len(ratios)."""
    _check(anchors.scales, anchors.feature_strides)
    return [_positions(anchors.image_size, f, anchors.anchor_stride) ** 2 * len(anchors.ratios)
            for f in anchors.feature_strides]


def generate_anchors(anchors: AnchorSettings) -> Tensor:
    """All anchors of the set: float32 [A, 4] (x1, y1, x2, y2) in padded-image pixels.

    Centres at (j + offset) * d; with round_sizes, half-sizes rounded to whole pixels (half to even).
    """
    a = anchors
    _check(a.scales, a.feature_strides)
    levels = []
    for scale, stride in zip(a.scales, a.feature_strides, strict=True):
        n = _positions(a.image_size, stride, a.anchor_stride)
        step = a.anchor_stride * stride
        # float64 while building so mirrored anchors agree to float32 rounding
        centres = (torch.arange(n, dtype=torch.float64) + a.offset) * step  # [n]
        r = torch.tensor(a.ratios, dtype=torch.float64)
        half_w = scale * r.sqrt() / 2  # [R]
        half_h = scale / r.sqrt() / 2  # [R]
        if a.round_sizes:
            half_w, half_h = half_w.round(), half_h.round()
        cy = centres[:, None, None]  # [n, 1, 1] row i
        cx = centres[None, :, None]  # [1, n, 1] column j
        shape = (n, n, len(a.ratios))
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


def flip_permutation(anchors: AnchorSettings) -> Tensor:
    """int64 [A]: index of each anchor's mirror image under x -> image_size - x (an involution).

    Raises ValueError when anchor_stride * feature_stride does not divide image_size on some level, or when the
    centres are not in the middle of their cells (offset != 0.5): the centres are then not mirror-symmetric and no
    such permutation exists. Rounded sizes keep the symmetry (rounding is the same on both sides).
    """
    a = anchors
    _check(a.scales, a.feature_strides)
    if a.offset != 0.5:
        raise ValueError(f"anchors are not mirror-symmetric: centres at (j + {a.offset}) * stride, not at "
                         "(j + 0.5) * stride")
    perms = []
    first = 0
    for stride in a.feature_strides:
        step = a.anchor_stride * stride
        if a.image_size % step:
            raise ValueError(f"anchors are not mirror-symmetric: image_size={a.image_size} is not a multiple of {step}")
        n = a.image_size // step
        idx = torch.arange(n * n * len(a.ratios)).reshape(n, n, len(a.ratios))  # [row, column, ratio]
        perms.append(idx.flip(1).reshape(-1) + first)  # column j <-> n - 1 - j
        first += idx.numel()
    return torch.cat(perms)


def anchors_from_config(config: Config) -> Tensor:
    """`generate_anchors` of a Config's anchor set (image.max_dim and the rpn section): float32 [A, 4]."""
    return generate_anchors(AnchorSettings.from_config(config))


def flip_permutation_from_config(config: Config) -> Tensor:
    """`flip_permutation` of a Config's anchor set: int64 [A]."""
    return flip_permutation(AnchorSettings.from_config(config))

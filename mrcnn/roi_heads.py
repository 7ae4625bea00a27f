"""RoI pooling over the FPN levels, the box head and the mask head.

Each RoI is pooled from one level (P2..P5; P6 serves the RPN only), chosen by eq. 1 of the FPN paper:
k = floor(k0 + log2(sqrt(w * h) / canonical_size)), clamped to the levels there are. With k0 = 4 and 224,
an ImageNet-sized 224x224 box pools from P4, 112x112 from P3, 448x448 from P5.

Glossary: N images, R RoIs, C feature channels, K classes including background (index 0).
RoIs: [R, 5] (image index, x1, y1, x2, y2) in padded-image pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from mrcnn.schema import Config


def assign_levels(
    boxes: Tensor, *, canonical_level: int, canonical_size: int, min_level: int = 2, max_level: int = 5
) -> Tensor:
    """boxes: [R, 4] (x1, y1, x2, y2) px -> int64 [R] FPN level in min_level..max_level (FPN eq. 1)."""
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).float().clamp(min=1e-6)
    # +1e-6: a box of exactly 2^j * canonical_size must land on level k0 + j despite log2 rounding.
    level = torch.floor(canonical_level + torch.log2(area.sqrt() / canonical_size) + 1e-6)
    return level.clamp(min_level, max_level).to(torch.int64)


def pool_rois(
    features: list[Tensor],
    rois: Tensor,
    *,
    output_size: int,
    strides: tuple[int, ...],
    canonical_level: int,
    canonical_size: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign each RoI on its FPN level.

    features: [P2, .., P5], Pl: [N, C, Hl, Wl] with stride strides[l - 2]; rois: [R, 5] (image index, x1, y1,
    x2, y2) padded px -> [R, C, output_size, output_size]. Loops over the (4) levels, never over RoIs.
    aligned=True: a pixel's centre is at +0.5, the convention of our boxes (pixel i covers [i, i+1));
    aligned=False samples half a feature cell off (torchvision's MultiScaleRoIAlign, which its weights learned).
    """
    min_level = int(round(math.log2(strides[0])))
    max_level = min_level + len(features) - 1
    levels = assign_levels(
        rois[:, 1:],
        canonical_level=canonical_level,
        canonical_size=canonical_size,
        min_level=min_level,
        max_level=max_level,
    )
    pooled, order = [], []
    for offset, feature in enumerate(features):
        idx = torch.nonzero(levels == min_level + offset).squeeze(1)
        # Pool in float32 at least: RoI coordinates in bf16 would be off by up to 4 px at 1024.
        dtype = torch.promote_types(feature.dtype, torch.float32)
        level_pooled = roi_align(
            feature.to(dtype),
            rois[idx].to(dtype),
            output_size=output_size,
            spatial_scale=1.0 / strides[offset],
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )
        pooled.append(level_pooled.to(feature.dtype))
        order.append(idx)
    # Level-by-level results back to the RoIs' own order: (R, C, s, s) grouped by level -> by RoI
    pooled_cat, order_cat = torch.cat(pooled), torch.cat(order)
    return pooled_cat[torch.argsort(order_cat)]


@dataclass(frozen=True)
class PoolSettings:
    """RoI pooling of both heads: `pool_rois`' settings over P2..P5 (`strides`), the box head's `pool_size` and the
    mask head's `mask_pool_size`."""

    strides: tuple[int, ...]
    canonical_level: int
    canonical_size: int
    sampling_ratio: int
    aligned: bool
    pool_size: int
    mask_pool_size: int

    @classmethod
    def from_config(cls, config: Config) -> PoolSettings:
        roi = config.roi
        return cls(strides=tuple(config.rpn.feature_strides[:4]), canonical_level=roi.canonical_level,
                   canonical_size=roi.canonical_size, sampling_ratio=roi.sampling_ratio, aligned=roi.aligned,
                   pool_size=roi.pool_size, mask_pool_size=roi.mask_pool_size)

    def pool(self, pyramid: list[Tensor], rois: Tensor, output_size: int) -> Tensor:
        """rois: [R, 5] (image index, x1, y1, x2, y2) -> [R, C, s, s] from P2..P5 (the pyramid's P6 is left out)."""
        return pool_rois(pyramid[: len(self.strides)], rois, output_size=output_size, strides=self.strides,
                         canonical_level=self.canonical_level, canonical_size=self.canonical_size,
                         sampling_ratio=self.sampling_ratio, aligned=self.aligned)


class BoxHead(nn.Module):
    """Two fully connected layers, then class logits [R, K] and class-specific deltas [R, K, 4].

    Deltas are (dx, dy, dw, dh) divided by the RoI bbox std, relative to the RoI.
    """

    def __init__(self, in_channels: int, pool_size: int, fc_dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.fc1 = nn.Linear(in_channels * pool_size * pool_size, fc_dim)
        self.fc2 = nn.Linear(fc_dim, fc_dim)
        self.class_logits = nn.Linear(fc_dim, num_classes)
        self.box_deltas = nn.Linear(fc_dim, num_classes * 4)
        # Detectron's init: near-uniform class scores and near-zero deltas at the start.
        nn.init.normal_(self.class_logits.weight, std=0.01)
        nn.init.normal_(self.box_deltas.weight, std=0.001)
        for layer in (self.class_logits, self.box_deltas):
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, config: Config, num_classes: int) -> BoxHead:
        """On the FPN's backbone.fpn_channels, pooled at roi.pool_size, roi.fc_dim wide."""
        return cls(config.backbone.fpn_channels, config.roi.pool_size, config.roi.fc_dim, num_classes)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """pooled: [R, C, s, s] -> (class logits [R, K], deltas [R, K, 4])."""
        x = torch.relu(self.fc1(pooled.flatten(1)))  # (R, C, s, s) -> (R, C*s*s) -> (R, fc_dim)
        x = torch.relu(self.fc2(x))
        deltas = self.box_deltas(x)
        return self.class_logits(x), deltas.view(deltas.shape[0], self.num_classes, 4)  # (R, K*4) -> (R, K, 4)


class MaskHead(nn.Module):
    """`num_convs` x (3x3 conv + ReLU), a 2x transposed conv + ReLU, a 1x1 conv to one mask logit per class.

    forward: [R, C, s, s] -> mask logits [R, K, 2s, 2s].
    """

    def __init__(self, in_channels: int, conv_dim: int, num_convs: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(channels, conv_dim, 3, padding=1), nn.ReLU(inplace=True)]
            channels = conv_dim
        self.convs = nn.Sequential(*layers)
        self.upsample = nn.ConvTranspose2d(channels, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        for module in [*self.convs, self.upsample]:
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, config: Config, num_classes: int) -> MaskHead:
        """On the FPN's backbone.fpn_channels, roi.mask_conv_layers convolutions roi.mask_conv_dim wide."""
        return cls(config.backbone.fpn_channels, config.roi.mask_conv_dim, config.roi.mask_conv_layers, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        x = self.convs(pooled)
        x = torch.relu(self.upsample(x))  # (R, D, s, s) -> (R, D, 2s, 2s)
        return self.predictor(x)  # (R, D, 2s, 2s) -> (R, K, 2s, 2s)

"""Feature Pyramid Network (Lin et al. 2017): C2..C5 -> P2..P6, all with the same channel count.

Glossary: N images; Ci has stride 2^i; Pi has stride 2^i. P6 is a stride-2 max-pool (kernel 1) of P5; it
serves only the RPN's largest anchors, as in the paper and torchvision's LastLevelMaxPool.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn.schema import Config


class FPN(nn.Module):
    """Lateral 1x1 convs, nearest-neighbour top-down pathway, 3x3 output convs, plus P6."""

    def __init__(self, in_channels: list[int], out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for conv in [*self.lateral, *self.output]:
            # Detectron's "c2_xavier_fill": no ReLU follows these convs, so a=1 (linear) Kaiming.
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    @classmethod
    def from_config(cls, config: Config, in_channels: list[int]) -> FPN:
        """On a backbone of `in_channels` (C2..C5), backbone.fpn_channels wide."""
        return cls(in_channels, config.backbone.fpn_channels)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: [C2, C3, C4, C5] -> [P2, P3, P4, P5, P6], Pi: [N, out_channels, Hi, Wi]."""
        top = self.lateral[-1](features[-1])
        outputs = [self.output[-1](top)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            # Upsample to the lateral's exact size: odd sizes (e.g. 25 -> 13) would not come back with scale=2.
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output[i](top))
        # (N, C, H5, W5) -> (N, C, ceil(H5/2), ceil(W5/2))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs

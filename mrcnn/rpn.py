"""Region Proposal Network head: one 3x3 conv shared by every FPN level, then objectness and box deltas.

Glossary: N images; L levels (P2..P6); A anchors per cell (one scale per level times the ratios);
Hi, Wi the anchor grid of level i. Outputs are flattened in the anchor order of `mrcnn.anchors`:
level, then row, then column, then ratio. Anchor labels in targets: 1 positive, 0 negative, -1 ignored.

With `anchor_stride` s > 1, anchors sit on every s-th feature cell, so the head's conv runs with stride s:
a 3x3 conv, padding 1, stride s turns a level of size n into ceil(n / s) cells, exactly
ceil(image_size / (feature_stride * s)), the anchor grid. Output cell j looks at feature cells around s*j;
its anchors are centred (s - 1) / 2 cells further right/down, a fixed offset the deltas learn.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mrcnn.schema import Config


class RPNHead(nn.Module):
    """Shared conv head. forward: [P2..P6] -> objectness logits [N, sum_i Hi*Wi*A], deltas [N, sum_i Hi*Wi*A, 4].

    Deltas are (dx, dy, dw, dh) divided by the RPN bbox std, relative to the anchors (see `mrcnn.box_coder`).
    """

    def __init__(self, in_channels: int, num_anchors: int, *, head_channels: int, anchor_stride: int):
        super().__init__()
        head_channels = head_channels or in_channels
        self.num_anchors = num_anchors
        self.anchor_stride = anchor_stride
        self.conv = nn.Conv2d(in_channels, head_channels, 3, stride=anchor_stride, padding=1)
        self.objectness = nn.Conv2d(head_channels, num_anchors, 1)
        self.deltas = nn.Conv2d(head_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, config: Config) -> RPNHead:
        """On the FPN's backbone.fpn_channels, one anchor per ratio a cell, rpn.head_channels wide (0: as the FPN),
        its conv at rpn.anchor_stride."""
        rpn = config.rpn
        return cls(config.backbone.fpn_channels, len(rpn.anchor_ratios), head_channels=rpn.head_channels,
                   anchor_stride=rpn.anchor_stride)

    def forward_level(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """feature: [N, C, H, W] -> raw maps: logits [N, A, Hi, Wi], deltas [N, A*4, Hi, Wi] (channel a*4 + k)."""
        hidden = torch.relu(self.conv(feature))
        return self.objectness(hidden), self.deltas(hidden)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        logits, deltas = [], []
        for feature in features:
            level_logits, level_deltas = self.forward_level(feature)
            n, a, h, w = level_logits.shape
            # (N, A, Hi, Wi) -> (N, Hi, Wi, A) -> (N, Hi*Wi*A)
            logits.append(level_logits.permute(0, 2, 3, 1).reshape(n, h * w * a))
            # (N, A*4, Hi, Wi) -> (N, A, 4, Hi, Wi) -> (N, Hi, Wi, A, 4) -> (N, Hi*Wi*A, 4)
            deltas.append(level_deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * a, 4))
        # L x (N, Hi*Wi*A) -> (N, sum_i Hi*Wi*A), level by level as the anchors are
        return torch.cat(logits, dim=1), torch.cat(deltas, dim=1)

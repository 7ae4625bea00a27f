from __future__ import annotations

import pytest
import torch

from mrcnn.anchors import AnchorSettings, anchors_per_level
from mrcnn.rpn import RPNHead

torch.set_num_threads(1)  # shared 2-core machine: one thread avoids OpenMP contention

SCALES, STRIDES, RATIOS = (8, 16, 32, 64, 128), (4, 8, 16, 32, 64), (0.5, 1.0, 2.0)


def _pyramid(size: int, channels: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(2, channels, -(-size // s), -(-size // s)) for s in STRIDES]


@pytest.mark.parametrize("anchor_stride", [1, 2])
@pytest.mark.parametrize("size", [128, 100])
def test_output_count_matches_the_anchors(anchor_stride, size):
    head = RPNHead(6, len(RATIOS), head_channels=0, anchor_stride=anchor_stride)
    logits, deltas = head(_pyramid(size))
    counts = anchors_per_level(AnchorSettings(
        image_size=size, scales=SCALES, feature_strides=STRIDES, ratios=RATIOS, anchor_stride=anchor_stride,
        offset=0.5, round_sizes=False,
    ))
    assert logits.shape == (2, sum(counts)) and deltas.shape == (2, sum(counts), 4)


def test_flattened_in_level_row_column_ratio_order():
    head = RPNHead(6, len(RATIOS), head_channels=0, anchor_stride=2)
    pyramid = _pyramid(128)
    logits, deltas = head(pyramid)
    raw = [head.forward_level(p) for p in pyramid]
    # anchor index = level offset + (row * W + column) * A + ratio; delta k of ratio a is channel a * 4 + k
    offset = 0
    for level_logits, level_deltas in raw:
        _, a, h, w = level_logits.shape
        for n, i, j, r in [(0, 0, 0, 0), (1, 0, w - 1, 2), (1, h - 1, 0, 1), (0, h // 2, w - 1, 2)]:
            index = offset + (i * w + j) * a + r
            assert logits[n, index] == level_logits[n, r, i, j]
            assert torch.equal(deltas[n, index], level_deltas[n, r * 4 : r * 4 + 4, i, j])
        offset += h * w * a
    assert offset == logits.shape[1]

from __future__ import annotations

import torch
from torchvision.ops import roi_align

from mrcnn.roi_heads import BoxHead, MaskHead, assign_levels, pool_rois

torch.set_num_threads(1)  # shared 2-core machine: one thread avoids OpenMP contention

# the coco preset's pooling: FPN eq. 1 with k0 = 4 at 224 px, 2 samples a bin side, pixel centres at +0.5
ALIGN = {"canonical_level": 4, "canonical_size": 224, "sampling_ratio": 2, "aligned": True}


def _square(size: float, x: float = 0.0) -> list[float]:
    return [x, 0.0, x + size, size]


def test_level_assignment_known_answers():
    boxes = torch.tensor([_square(s) for s in (224, 112, 448, 223, 10, 2000)] + [[0.0, 0.0, 448.0, 112.0]])
    # 224 -> k0 = 4, halving/doubling moves one level; 223 just below 224 -> 3; clamped to 2..5;
    # a 448x112 box has sqrt(area) = 224 -> 4
    levels = assign_levels(boxes, canonical_level=4, canonical_size=224)
    torch.testing.assert_close(levels, torch.tensor([4, 3, 5, 3, 2, 5, 4]))
    # canonical 112 px on P4: everything one level up (still clamped at 5)
    levels = assign_levels(boxes, canonical_level=4, canonical_size=112)
    torch.testing.assert_close(levels, torch.tensor([5, 4, 5, 4, 2, 5, 5]))


def test_pool_rois_uses_each_rois_own_level_and_keeps_roi_order():
    torch.manual_seed(0)
    strides = (4, 8, 16, 32)
    features = [torch.randn(2, 3, 256 // s, 256 // s) for s in strides]
    rois = torch.tensor([[1] + _square(230, 10), [0] + _square(30, 5), [1] + _square(120, 40), [0] + _square(60, 3)])
    pooled = pool_rois(features, rois, output_size=7, strides=strides, **ALIGN)
    assert pooled.shape == (4, 3, 7, 7)
    for r, level in enumerate([4, 2, 3, 2]):  # sqrt(area) 230, 30, 120, 60 with k0 = 4 at 224
        scale = 1 / strides[level - 2]
        expected = roi_align(
            features[level - 2], rois[r : r + 1], 7, spatial_scale=scale, sampling_ratio=2, aligned=True
        )
        torch.testing.assert_close(pooled[r : r + 1], expected)


def test_pool_rois_with_no_rois():
    features = [torch.randn(1, 3, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    pooled = pool_rois(features, torch.zeros(0, 5), output_size=14, strides=(4, 8, 16, 32), **ALIGN)
    assert pooled.shape == (0, 3, 14, 14)


def test_head_shapes():
    box_head = BoxHead(in_channels=3, pool_size=7, fc_dim=16, num_classes=5)
    logits, deltas = box_head(torch.randn(6, 3, 7, 7))
    assert logits.shape == (6, 5) and deltas.shape == (6, 5, 4)
    mask_head = MaskHead(in_channels=3, conv_dim=8, num_convs=2, num_classes=5)
    assert mask_head(torch.randn(6, 3, 14, 14)).shape == (6, 5, 28, 28)
    assert len([m for m in mask_head.convs if isinstance(m, torch.nn.Conv2d)]) == 2


def test_unaligned_pooling_is_torchvisions_multiscale_roi_align():
    """roi.aligned=False: exactly torchvision's MultiScaleRoIAlign (levels by FPN eq. 1, aligned=False); the default
    aligned=True samples half a cell away, which its weights never saw."""
    from collections import OrderedDict

    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    strides = (4, 8, 16, 32)
    features = [torch.randn(2, 3, 256 // s, 256 // s) for s in strides]
    boxes = [torch.tensor([_square(30, 5), _square(60, 3)]), torch.tensor([_square(230, 10), _square(120, 40.5)])]
    rois = torch.cat([torch.cat([torch.full((2, 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    pooler = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    theirs = pooler(OrderedDict((str(i), f) for i, f in enumerate(features)), boxes, [(256, 256), (256, 256)])
    ours = pool_rois(features, rois, output_size=7, strides=strides, **{**ALIGN, "aligned": False})
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.allclose(pool_rois(features, rois, output_size=7, strides=strides, **ALIGN), theirs, atol=1e-3)

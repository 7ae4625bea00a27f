from __future__ import annotations

import torch
import torch.nn.functional as F

from mrcnn.fpn import FPN

torch.set_num_threads(1)  # shared 2-core machine: one thread avoids OpenMP contention


def _features(size: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(1, c, -(-size // s), -(-size // s)) for c, s in ((8, 4), (16, 8), (32, 16), (64, 32))]


def test_levels_have_strides_4_to_64_and_the_configured_channels():
    outputs = FPN([8, 16, 32, 64], out_channels=12)(_features(128))
    assert [tuple(p.shape) for p in outputs] == [(1, 12, n, n) for n in (32, 16, 8, 4, 2)]


def test_odd_sizes_upsample_to_the_lateral_size():
    outputs = FPN([8, 16, 32, 64], out_channels=4)(_features(100))  # C2..C5: 25, 13, 7, 4
    assert [p.shape[-1] for p in outputs] == [25, 13, 7, 4, 2]


def test_p6_is_p5_subsampled_and_top_down_sums_laterals():
    fpn = FPN([8, 16, 32, 64], out_channels=4)
    c = _features(128)
    p2, p3, p4, p5, p6 = fpn(c)
    torch.testing.assert_close(p6, p5[:, :, ::2, ::2])  # max-pool with kernel 1, stride 2
    # P4 by hand: lateral(C4) + nearest-upsampled (lateral(C5)), then the 3x3 output conv
    top = fpn.lateral[3](c[3])
    merged = fpn.lateral[2](c[2]) + F.interpolate(top, scale_factor=2, mode="nearest")
    torch.testing.assert_close(p4, fpn.output[2](merged))
    torch.testing.assert_close(p5, fpn.output[3](top))

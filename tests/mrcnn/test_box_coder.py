import math

import torch
from torchvision.models.detection._utils import BoxCoder

from mrcnn.box_coder import DELTA_CLAMP, decode, encode

STD = (0.1, 0.1, 0.2, 0.2)  # torchvision's BoxCoder weights (10, 10, 5, 5)


def _random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 500
    wh = torch.rand(n, 2, generator=generator) * 200 + 20  # size ratios below 1000 / 16: no clamping
    return torch.cat([xy, xy + wh], dim=1)


def test_one_delta_worked_by_hand():
    # reference centre (15, 30), 10 x 20; box centre (20, 25), 20 x 10
    reference = torch.tensor([[10.0, 20.0, 20.0, 40.0]])
    box = torch.tensor([[10.0, 20.0, 30.0, 30.0]])
    # dx = 5 / 10 / 0.1 = 5, dy = -5 / 20 / 0.1 = -2.5, dw = log 2 / 0.2, dh = log 0.5 / 0.2
    expected = torch.tensor([[5.0, -2.5, math.log(2) / 0.2, math.log(0.5) / 0.2]])
    torch.testing.assert_close(encode(box, reference, std=STD), expected)
    torch.testing.assert_close(decode(expected, reference, std=STD), box)


def test_custom_std():
    reference = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    box = torch.tensor([[1.0, 2.0, 11.0, 12.0]])
    torch.testing.assert_close(encode(box, reference, std=(1, 1, 1, 1)), torch.tensor([[0.1, 0.2, 0.0, 0.0]]))


def test_round_trip():
    g = torch.Generator().manual_seed(0)
    boxes, reference = _random_boxes(1000, g), _random_boxes(1000, g)
    back = decode(encode(boxes, reference, std=STD), reference, std=STD)
    torch.testing.assert_close(back, boxes, rtol=1e-5, atol=1e-3)


def test_equals_torchvision_box_coder():
    g = torch.Generator().manual_seed(1)
    boxes, reference = _random_boxes(500, g), _random_boxes(500, g)
    tv = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(encode(boxes, reference, std=STD), tv.encode_single(boxes, reference))
    deltas = torch.randn(500, 4, generator=g) * 3  # wide enough that some dw, dh hit the clamp
    torch.testing.assert_close(decode(deltas, reference, std=STD), tv.decode_single(deltas, reference))


def test_decode_broadcasts_class_specific_deltas_like_torchvision():
    g = torch.Generator().manual_seed(2)
    reference = _random_boxes(7, g)
    deltas = torch.randn(7, 3, 4, generator=g)
    out = decode(deltas, reference, std=STD)
    assert out.shape == (7, 3, 4)
    tv = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).decode(deltas.reshape(7, 12), [reference])  # [7, 3, 4]
    torch.testing.assert_close(out, tv.reshape(7, 3, 4))
    for k in range(3):
        torch.testing.assert_close(out[:, k], decode(deltas[:, k], reference, std=STD))


def test_decode_clamps_dw_dh():
    reference = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    huge = torch.tensor([[0.0, 0.0, 1e4, 1e4]])
    out = decode(huge, reference, std=STD)
    assert torch.isfinite(out).all()
    side = 16 * math.exp(DELTA_CLAMP)  # 1000
    torch.testing.assert_close(out, torch.tensor([[8 - side / 2, 8 - side / 2, 8 + side / 2, 8 + side / 2]]))

import pytest
import torch

from mrcnn.geometry import Geometry, boxes_to_original, coco_bbox_to_box, resize_geometry


def test_landscape_at_coco_is_limited_by_max_dim():
    # 800 / 480 = 1.667 would make the long side 1067 > 1024, so scale = 1024 / 640 = 1.6
    g = resize_geometry(480, 640, min_dim=800, max_dim=1024)
    assert g == Geometry(scale=1.6, new_h=768, new_w=1024, window=(0, 0, 1024, 768))


def test_portrait_at_coco():
    g = resize_geometry(640, 480, min_dim=800, max_dim=1024)
    assert g == Geometry(scale=1.6, new_h=1024, new_w=768, window=(0, 0, 768, 1024))


def test_short_side_reaches_min_dim_when_long_side_fits():
    # 500 x 600: 800 / 500 = 1.6, long side 960 <= 1024
    g = resize_geometry(500, 600, min_dim=800, max_dim=1024)
    assert g == Geometry(scale=1.6, new_h=800, new_w=960, window=(0, 0, 960, 800))


def test_very_wide_image_limited_by_max_dim():
    # 100 x 1000: min_dim would give scale 8; max_dim gives 1.024 -> 102.4 rounds to 102 high
    g = resize_geometry(100, 1000, min_dim=800, max_dim=1024)
    assert g.scale == pytest.approx(1.024)
    assert (g.new_h, g.new_w, g.window) == (102, 1024, (0, 0, 1024, 102))


def test_square_preset_small_image_upscaled():
    g = resize_geometry(64, 32, min_dim=128, max_dim=128)
    assert g == Geometry(scale=2.0, new_h=128, new_w=64, window=(0, 0, 64, 128))


def test_rounding_of_long_side_decides_the_limit():
    # 1024 * (800/799) ~ 1025.28 rounds to 1025 > 1024: limited
    g = resize_geometry(799, 1024, min_dim=800, max_dim=1024)
    assert g.scale == 1.0 and (g.new_h, g.new_w) == (799, 1024)


def test_coco_bbox_to_box_worked_example():
    box = coco_bbox_to_box([[10.0, 20.0, 30.0, 40.0]], scale=1.6)
    torch.testing.assert_close(box, torch.tensor([[16.0, 32.0, 64.0, 96.0]]))
    assert box.dtype == torch.float32


def test_boxes_to_original_inverts_coco_bbox_to_box():
    g = resize_geometry(480, 640, min_dim=800, max_dim=1024)
    xywh = torch.tensor([[0.0, 0.0, 640.0, 480.0], [12.5, 7.25, 3.0, 100.0]])
    padded = coco_bbox_to_box(xywh, g.scale)
    back = boxes_to_original(padded, scale=g.scale, window=g.window)
    expected = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    torch.testing.assert_close(back, expected)


def test_boxes_to_original_subtracts_window_offset():
    back = boxes_to_original(torch.tensor([[14.0, 24.0, 34.0, 44.0]]), scale=2.0, window=(4, 4, 104, 104))
    torch.testing.assert_close(back, torch.tensor([[5.0, 10.0, 15.0, 20.0]]))

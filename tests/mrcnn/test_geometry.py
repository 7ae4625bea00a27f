import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mrcnn.geometry import Geometry, _resize_float, boxes_to_original, coco_bbox_to_box, resize_geometry, resize_image


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
    # 1000 * (800/781) ~ 1024.33 rounds to 1024, exactly max_dim: not limited, the scale stays min_dim's
    g = resize_geometry(781, 1000, min_dim=800, max_dim=1024)
    assert g.scale == 800 / 781 and (g.new_h, g.new_w) == (800, 1024)


def test_a_size_must_be_positive_on_either_side():
    assert resize_geometry(1, 1, min_dim=8, max_dim=8).window == (0, 0, 8, 8)
    for height, width in ((0, 5), (5, 0), (-1, 5)):
        with pytest.raises(ValueError, match=f"^image size must be positive, got {height}x{width}$"):
            resize_geometry(height, width, min_dim=8, max_dim=8)


def test_coco_bbox_to_box_worked_example():
    box = coco_bbox_to_box([[10.0, 20.0, 30.0, 40.0]], scale=1.6)
    torch.testing.assert_close(box, torch.tensor([[16.0, 32.0, 64.0, 96.0]]))
    assert box.dtype == torch.float32
    assert coco_bbox_to_box(np.array([[10.0, 20.0, 30.0, 40.0]]), scale=1.6).dtype == torch.float32  # from float64


def test_boxes_to_original_inverts_coco_bbox_to_box():
    g = resize_geometry(480, 640, min_dim=800, max_dim=1024)
    xywh = torch.tensor([[0.0, 0.0, 640.0, 480.0], [12.5, 7.25, 3.0, 100.0]])
    padded = coco_bbox_to_box(xywh, g.scale)
    back = boxes_to_original(padded, scale=g.scale, window=g.window)
    expected = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    torch.testing.assert_close(back, expected)


def test_boxes_to_original_subtracts_window_offset():
    # x and y offsets differ, so that one used for the other shows
    back = boxes_to_original(torch.tensor([[14.0, 24.0, 34.0, 44.0]]), scale=2.0, window=(4, 6, 104, 106))
    torch.testing.assert_close(back, torch.tensor([[5.0, 9.0, 15.0, 19.0]]))
    # float64 boxes (numpy's default) come back float32, like every other box of the way back
    boxes64 = np.array([[14.0, 24.0, 34.0, 44.0]])
    assert boxes_to_original(boxes64, scale=2.0, window=(0, 0, 9, 9)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- resize_image


def _texture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 [3, h, w]: smooth gradients plus noise, so that a wrong filter or offset shows."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = torch.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256])
    return (base + torch.randint(-40, 41, (3, h, w), generator=g)).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize(("h", "w", "new_h", "new_w"), [(48, 64, 77, 102), (64, 48, 20, 15), (31, 57, 31, 100)])
def test_resize_image_is_pil_bilinear_within_one_grey_level(h, w, new_h, new_w):
    """PIL's BILINEAR (antialiased when shrinking) is the independent reference: v1 shards were resized with it."""
    image = _texture(h, w)
    got = resize_image(image, new_h, new_w)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((new_w, new_h), Image.Resampling.BILINEAR)
    expected = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    assert got.dtype == torch.uint8 and got.shape == (3, new_h, new_w)
    assert (got.int() - expected.int()).abs().max() <= 1


def test_resize_image_float_path_agrees_with_the_uint8_path():
    """The CUDA branch (float32, rounded) run on CPU: what a GPU gives is the CPU's pixels up to rounding."""
    image = _texture(60, 80, seed=1)
    for new_h, new_w in ((96, 128), (30, 40), (60, 81)):
        cpu = resize_image(image, new_h, new_w)
        flt = _resize_float(image[None], new_h, new_w)[0]
        diff = (cpu.int() - flt.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.5, (new_h, new_w, diff.max(), diff.float().mean())
        assert flt.dtype == torch.uint8
        # on the CPU resize_image is torch's own uint8 kernel, not the float path (they differ here by rounding)
        uint8 = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        assert torch.equal(cpu, uint8[0]) and diff.max() == 1
    black = torch.zeros(1, 3, 5, 7, dtype=torch.uint8)
    assert (_resize_float(black, 9, 3) == 0).all()  # black stays black: the clamp's floor is 0


def test_resize_image_keeps_the_size_batches_and_refuses_other_input():
    image = _texture(10, 12)
    assert resize_image(image, 10, 12) is image
    batch = torch.stack([image, _texture(10, 12, seed=2)])
    got = resize_image(batch, 15, 18)
    assert got.shape == (2, 3, 15, 18)
    assert torch.equal(got[1], resize_image(batch[1], 15, 18))
    constant = torch.full((3, 7, 9), 77, dtype=torch.uint8)
    assert (resize_image(constant, 20, 3) == 77).all()  # a flat image stays flat at any size
    with pytest.raises(ValueError, match="uint8"):
        resize_image(image.float(), 5, 5)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        resize_image(image[:2], 5, 5)
    with pytest.raises(ValueError, match="positive"):
        resize_image(image, 0, 5)
    with pytest.raises(ValueError, match="positive"):
        resize_image(image, 5, 0)
    # one pixel is a size (1 x 1 itself trips an internal assert of torch 2.14's uint8 antialias kernel)
    assert resize_image(image, 1, 3).shape == (3, 1, 3) and resize_image(image, 3, 1).shape == (3, 3, 1)

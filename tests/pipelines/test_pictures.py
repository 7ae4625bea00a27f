"""Pictures: PNG sizes known from figsize * dpi, and mask overlays landing on exactly the right pixels."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from pipelines.infra.storage import write_bytes
from pipelines.pictures import draw_instances, overlay_color, predictions_grid, save_figure

H, W, DPI = 60, 80, 100
GRAY = 100


def _read_png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _render_one_pixel_per_pixel(tmp_path, image, **kwargs) -> np.ndarray:
    """Draw on an axes filling a W x H pixel figure (one image pixel = one PNG pixel) and read it back."""
    height, width = image.shape[:2]
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes([0, 0, 1, 1])
    draw_instances(ax, image, **kwargs)
    png = _read_png(save_figure(fig, tmp_path / "draw.png"))
    assert png.shape == (height, width, 3)
    return png


def test_overlay_color_is_deterministic_and_distinct():
    colors = [overlay_color(i) for i in range(12)]
    assert colors == [overlay_color(i) for i in range(12)]
    assert all(isinstance(c, int) and 0 <= c <= 255 for rgb in colors for c in rgb)
    # neighbours in the sequence (what sits side by side in one picture) are far apart in RGB
    arr = np.array(colors, dtype=float)
    assert np.linalg.norm(arr[1:] - arr[:-1], axis=1).min() > 100
    assert len(set(colors)) == 12


def test_mask_overlay_lands_on_exactly_the_mask_pixels(tmp_path):
    image = np.full((H, W, 3), GRAY, np.uint8)
    masks = np.zeros((1, H, W), bool)
    masks[0, 30:46, 30:51] = True  # rows 30..45, columns 30..50
    masks[0, 40:46, 30:36] = False  # a notch, so the check is not just "a rectangle somewhere"
    box = [20, 22, 70, 56]  # x1, y1, x2, y2: around the mask with a margin, so its outline misses the mask
    alpha = 0.45
    png = _render_one_pixel_per_pixel(tmp_path, image, boxes=[box], masks=masks, labels=["cat"], scores=[0.93],
                                      alpha=alpha)  # fmt: skip
    tint = np.rint(GRAY * (1 - alpha) + np.array(overlay_color(0)) * alpha).astype(int)

    # inside the box, 3 px clear of its outline: every pixel is tinted iff it belongs to the mask
    rows, cols = slice(25, 54), slice(23, 68)
    region = png[rows, cols].astype(int)
    is_tinted = np.abs(region - tint).max(axis=2) <= 1
    is_gray = np.abs(region - GRAY).max(axis=2) <= 1
    np.testing.assert_array_equal(is_tinted, masks[0, rows, cols])
    np.testing.assert_array_equal(is_gray, ~masks[0, rows, cols])

    # far from the instance (below and left of the box): the image untouched, the tint nowhere
    far = png[:, :15].astype(int)
    assert (far == GRAY).all()
    below = png[58:, :].astype(int)
    assert (below == GRAY).all()
    assert not (np.abs(png.astype(int) - tint).max(axis=2) <= 1)[~masks[0]].any()

    # the box outline is drawn in the instance colour (its left edge, x = 20)
    outline = png[35, 19:22].astype(int)
    assert (np.abs(outline - np.array(overlay_color(0))).max(axis=1) <= 40).any()


def test_two_masks_get_two_colours_and_boxes_alone_leave_image(tmp_path):
    image = np.full((H, W, 3), GRAY, np.uint8)
    masks = np.zeros((2, H, W), bool)
    masks[0, 30:40, 10:20] = True
    masks[1, 30:40, 50:60] = True
    boxes = [[5, 25, 25, 45], [45, 25, 65, 45]]
    png = _render_one_pixel_per_pixel(tmp_path, image, boxes=boxes, masks=masks, labels=["a", "b"], scores=None)
    first, second = png[35, 15].astype(int), png[35, 55].astype(int)
    for got, i in ((first, 0), (second, 1)):
        expected = np.rint(GRAY * 0.55 + np.array(overlay_color(i)) * 0.45)
        assert np.abs(got - expected).max() <= 1
    assert np.abs(first - second).max() > 20

    no_masks = _render_one_pixel_per_pixel(tmp_path, image, boxes=boxes, masks=None, labels=["a", "b"])
    assert (no_masks[35, 15] == GRAY).all() and (no_masks[35, 55] == GRAY).all()


def test_draw_instances_rejects_mismatched_inputs():
    fig = Figure(figsize=(1, 1), dpi=50)
    ax = fig.add_axes([0, 0, 1, 1])
    image = np.zeros((H, W, 3), np.uint8)
    with pytest.raises(ValueError, match="labels"):
        draw_instances(ax, image, boxes=[[0, 0, 5, 5]], labels=[])
    with pytest.raises(ValueError, match="masks"):
        draw_instances(ax, image, boxes=[[0, 0, 5, 5]], labels=["a"], masks=np.zeros((1, 10, 10), bool))
    with pytest.raises(ValueError, match="uint8"):
        draw_instances(ax, image.astype(np.float32), boxes=[], labels=[])


def test_predictions_grid_size(tmp_path):
    rng = np.random.default_rng(0)

    def item(i):
        image = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
        masks = np.zeros((2, 40, 50), bool)
        masks[0, 5:15, 5:20] = True
        masks[1, 20:35, 25:45] = True
        return {"image": image, "boxes": np.array([[5, 5, 20, 15], [25, 20, 45, 35]], np.float32), "masks": masks,
                "labels": ["cat", "dog"], "scores": np.array([0.9, 0.5]), "title": f"image {i}"}  # fmt: skip

    # 5 items, 4 columns -> 2 rows x 4 columns of 1-inch panels at 50 dpi
    path = predictions_grid([item(i) for i in range(5)], tmp_path / "grid.png", cols=4, panel_inches=1.0, dpi=50)
    assert _read_png(path).shape == (100, 200, 3)
    # fewer items than columns: as many columns as items; an image without detections is fine
    empty = {"image": np.zeros((40, 50, 3), np.uint8), "boxes": np.zeros((0, 4)), "labels": []}
    path = predictions_grid([item(0), empty], tmp_path / "two.png", cols=4, panel_inches=1.0, dpi=50)
    assert _read_png(path).shape == (50, 100, 3)
    with pytest.raises(ValueError):
        predictions_grid([], tmp_path / "none.png")


def test_write_bytes_makes_folders(tmp_path):
    path = write_bytes(tmp_path / "a" / "b" / "x.bin", b"abc")
    assert open(path, "rb").read() == b"abc"

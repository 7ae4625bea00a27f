from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mrcnn.detections import detect, detections_to_original, paste_masks_in_image


def _log(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


def _detect(min_confidence: float, max_detections: int = 10) -> list[dict[str, torch.Tensor]]:
    # image 0: two overlapping RoIs agreeing on class 1; image 1: a RoI at the same place, shifted by its deltas
    rois = torch.tensor([[10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 52.0, 50.0], [10.0, 10.0, 50.0, 50.0]])
    logits = _log([[0.05, 0.9, 0.05], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    deltas = torch.zeros(3, 3, 4)
    deltas[2, 1, 0] = 1.0  # dx = 1 * 0.1 * 40 = +4 px for class 1 only
    return detect(
        logits,
        deltas,
        rois,
        torch.tensor([0, 0, 1]),
        torch.tensor([[0, 0, 100, 100], [0, 0, 45, 60]]),
        bbox_std=(0.1, 0.1, 0.2, 0.2),
        min_confidence=min_confidence,
        nms_threshold=0.3,
        max_detections=max_detections,
        min_size=0.01,
    )


def test_per_class_nms_threshold_decoding_and_clipping():
    image0, image1 = _detect(min_confidence=0.5)
    torch.testing.assert_close(image0["boxes"], torch.tensor([[10.0, 10.0, 50.0, 50.0]]))  # RoI 1 suppressed
    assert image0["class_ids"].tolist() == [1] and image0["roi_index"].tolist() == [0]
    assert image0["scores"].tolist() == pytest.approx([0.9])
    # NMS never crosses images: image 1 keeps its box (shifted +4 px, clipped to its 45 px wide window)
    torch.testing.assert_close(image1["boxes"], torch.tensor([[14.0, 10.0, 45.0, 50.0]]))
    assert image1["class_ids"].tolist() == [1] and image1["roi_index"].tolist() == [2]


def test_classes_do_not_suppress_each_other_and_max_detections():
    image0, image1 = _detect(min_confidence=0.06)
    # class 2 (scores 0.1 and 0.05 < 0.06) keeps RoI 1's box; class 1 keeps RoI 0's
    assert image0["class_ids"].tolist() == [1, 2] and image0["roi_index"].tolist() == [0, 1]
    assert image0["scores"].tolist() == pytest.approx([0.9, 0.1])
    assert image1["class_ids"].tolist() == [1, 2] and image1["scores"].tolist() == pytest.approx([0.7, 0.1])
    image0, image1 = _detect(min_confidence=0.06, max_detections=1)
    assert image0["class_ids"].tolist() == [1] and image1["class_ids"].tolist() == [1]


def test_paste_full_mask_fills_exactly_the_box_pixels():
    pasted = paste_masks_in_image(torch.ones(1, 28, 28), torch.tensor([[10.0, 20.0, 50.0, 60.0]]), 70, 80)
    expected = torch.zeros(1, 70, 80, dtype=torch.bool)
    expected[0, 20:60, 10:50] = True
    assert pasted.dtype == torch.bool and torch.equal(pasted, expected)


def test_paste_matches_grid_sample():
    torch.manual_seed(0)
    masks = torch.rand(3, 28, 28)
    boxes = torch.tensor([[3.3, 5.2, 40.7, 31.9], [-10.0, 20.0, 30.0, 75.0], [0.0, 0.0, 64.0, 48.0]])
    height, width = 48, 64
    # Reference: sample every output pixel centre with grid_sample (align_corners=False, zero padding)
    ys = torch.arange(height) + 0.5
    xs = torch.arange(width) + 0.5
    gx = (xs[None, :] - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1]) * 2 - 1  # [D, W]
    gy = (ys[None, :] - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1  # [D, H]
    grid = torch.stack([gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)], dim=-1)
    reference = F.grid_sample(masks[:, None], grid, mode="bilinear", align_corners=False)[:, 0]
    pasted = paste_masks_in_image(masks, boxes, height, width)
    decided = (reference - 0.5).abs() > 1e-4  # pixels not within rounding of the threshold
    assert torch.equal(pasted[decided], (reference >= 0.5)[decided])
    assert paste_masks_in_image(torch.zeros(0, 28, 28), torch.zeros(0, 4), 5, 6).shape == (0, 5, 6)


def test_detections_to_original_maps_boxes_and_pastes_masks():
    det = {
        "boxes": torch.tensor([[10.0, 20.0, 90.0, 70.0], [80.0, 60.0, 104.0, 84.0]]),
        "class_ids": torch.tensor([3, 1]),
        "scores": torch.tensor([0.9, 0.8]),
        "masks": torch.ones(2, 28, 28),
    }
    out = detections_to_original(det, scale=2.0, window=(0, 0, 100, 80), height=40, width=50)
    # / scale 2, and the second box clipped to the 50 x 40 image
    torch.testing.assert_close(out["boxes"], torch.tensor([[5.0, 10.0, 45.0, 35.0], [40.0, 30.0, 50.0, 40.0]]))
    expected = torch.zeros(40, 50, dtype=torch.bool)
    expected[10:35, 5:45] = True
    assert out["masks"].shape == (2, 40, 50) and torch.equal(out["masks"][0], expected)
    assert out["masks"][1].sum().item() == 10 * 10  # rows 30..39, columns 40..49
    assert out["class_ids"].tolist() == [3, 1] and out["scores"].tolist() == pytest.approx([0.9, 0.8])


def test_pad_per_image_puts_each_images_rows_first_and_counts_them():
    """Rows of images 0, 0, 2 (image 1 has none) padded to 2 an image: counts 2, 0, 1 and zeros after each count."""
    from mrcnn.detections import pad_per_image

    columns = {"scores": torch.tensor([0.9, 0.8, 0.7]), "boxes": torch.arange(12.0).view(3, 4)}
    out = pad_per_image(columns, torch.tensor([0, 0, 2]), num_images=3, size=2)
    torch.testing.assert_close(out["count"], torch.tensor([2, 0, 1]))
    torch.testing.assert_close(out["scores"], torch.tensor([[0.9, 0.8], [0.0, 0.0], [0.7, 0.0]]))
    expected = torch.zeros(3, 2, 4)
    expected[0] = columns["boxes"][:2]
    expected[2, 0] = columns["boxes"][2]
    torch.testing.assert_close(out["boxes"], expected)

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


# Boundaries and wiring (issue 31): thresholds met exactly, and settings that reach `detect`.
# Two classes (background, 1) with equal logits: softmax gives exactly 0.5 to each.
HALF = torch.zeros(1, 2)
WINDOW = torch.tensor([[0, 0, 100, 100]])
STD = (0.1, 0.1, 0.2, 0.2)


def _detect_rois(rois, logits=None, **kw):
    rois = torch.tensor(rois, dtype=torch.float32)
    logits = torch.zeros(rois.shape[0], 2) if logits is None else logits
    settings = dict(bbox_std=STD, min_confidence=0.5, nms_threshold=0.3, max_detections=10, min_size=0.01)
    settings.update(kw)
    return detect(logits, torch.zeros(rois.shape[0], 2, 4), rois, torch.zeros(rois.shape[0], dtype=torch.int64),
                  WINDOW, **settings)[0]


def test_a_score_exactly_at_min_confidence_is_kept():
    assert torch.softmax(HALF, dim=1)[0, 1].item() == 0.5  # the premise: exactly representable
    kept = _detect_rois([[10, 10, 50, 50]], min_confidence=0.5)
    assert kept["scores"].tolist() == [0.5]
    assert _detect_rois([[10, 10, 50, 50]], min_confidence=0.5001)["scores"].numel() == 0


def test_nms_just_above_and_below_the_overlap():
    # same class, IoU exactly 1/3 (100 px shared of 300); the second has the lower score
    rois = [[0, 0, 20, 10], [10, 0, 30, 10]]
    logits = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    assert _detect_rois(rois, logits, nms_threshold=0.34)["roi_index"].tolist() == [0, 1]  # IoU below: both stay
    assert _detect_rois(rois, logits, nms_threshold=0.33)["roi_index"].tolist() == [0]  # above: suppressed


def test_boxes_on_the_window_edge_kept_as_they_are_and_zero_size_dropped():
    # a box touching all four window edges; one reaching past it (clipped onto the edge); one wholly right of the
    # window (clipped to zero width) and one wholly below it (zero height): those two are dropped
    rois = [[0, 0, 100, 100], [50, 50, 120, 130], [100, 10, 140, 30], [10, 100, 30, 140]]
    logits = torch.tensor([[0.0, 4.0], [0.0, 3.0], [0.0, 2.0], [0.0, 1.0]])
    kept = _detect_rois(rois, logits, nms_threshold=0.9)
    torch.testing.assert_close(kept["boxes"], torch.tensor([[0.0, 0.0, 100.0, 100.0], [50.0, 50.0, 100.0, 100.0]]))
    assert kept["roi_index"].tolist() == [0, 1]
    # min_size 0 keeps the zero-size boxes too (sizes >= min_size): the rule is inclusive
    assert _detect_rois(rois, logits, nms_threshold=0.9, min_size=0.0)["roi_index"].tolist() == [0, 1, 2, 3]
    # a box exactly min_size wide is kept, one a little narrower is not
    assert _detect_rois([[10, 10, 12, 50]], min_size=2.0)["roi_index"].tolist() == [0]
    assert _detect_rois([[10, 10, 11.9, 50]], min_size=2.0)["roi_index"].numel() == 0


def test_every_detection_setting_reaches_detect():
    from mrcnn.config import shapes
    from mrcnn.detections import DetectionSettings

    # two same-class boxes overlapping at IoU 1/3, scores 0.88 and 0.73; the second 20 x 10, shifted by its dx,
    # the first 20 x 12
    rois = torch.tensor([[0.0, 0.0, 20.0, 12.0], [10.0, 0.0, 30.0, 10.0]])
    logits = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    deltas = torch.zeros(2, 2, 4)
    deltas[1, 1, 0] = 0.5  # dx 0.5 * std_x * width 20

    def run(*overrides):
        config = shapes().override(["roi.bbox_std=[0.1,0.1,0.2,0.2]", "detection.min_confidence=0.5",
                                    "detection.nms_threshold=0.5", "detection.max_detections=10",
                                    "detection.min_size=0.01", *overrides])
        settings, image_idx = DetectionSettings.from_config(config), torch.zeros(2, dtype=torch.int64)
        out = settings.detect(logits, deltas, rois, image_idx, WINDOW)[0]
        flat = settings.detect_flat(logits, deltas, rois, image_idx, WINDOW)  # the model's (and ONNX's) way in
        assert flat["roi_index"].tolist() == out["roi_index"].tolist() and torch.equal(flat["boxes"], out["boxes"])
        return out["roi_index"].tolist(), [box[0] for box in out["boxes"].tolist()]

    assert run() == ([0, 1], [0.0, 11.0])
    assert run("detection.nms_threshold=0.2") == ([0], [0.0])  # the config's NMS threshold, not a fixed one
    assert run("detection.min_confidence=0.8") == ([0], [0.0])
    assert run("detection.max_detections=1") == ([0], [0.0])
    assert run("detection.min_size=11") == ([0], [0.0])  # the 10 px high box is dropped
    assert run("roi.bbox_std=[0.2,0.1,0.2,0.2]") == ([0, 1], [0.0, 12.0])


def test_paste_threshold_is_inclusive():
    # a constant 0.5 mask: every pixel inside the box samples exactly 0.5, which is in the mask
    pasted = paste_masks_in_image(torch.full((1, 28, 28), 0.5), torch.tensor([[2.0, 2.0, 10.0, 10.0]]), 12, 12)
    assert pasted[0, 3:9, 3:9].all() and not pasted[0, :2].any()


def test_paste_in_chunks_reaches_every_mask():
    # a 4096 x 2049 image: one mask per chunk (2**24 // (4096 * 2049) = 1), so each is in a chunk of its own;
    # five masks of 4 x 4: more masks than mask rows, so a loop over the wrong dimension stops short
    corners = torch.tensor([[0.0, 0.0], [100.0, 200.0], [300.0, 0.0], [0.0, 2000.0], [4000.0, 1000.0]])
    boxes = torch.cat([corners, corners + 8.0], dim=1)
    pasted = paste_masks_in_image(torch.ones(5, 4, 4), boxes, 2049, 4096)
    for i, (x, y) in enumerate(corners.long().tolist()):
        assert pasted[i, y : y + 8, x : x + 8].all(), i
    assert pasted.sum().item() == 5 * 64


def test_detections_to_original_clips_a_box_past_the_origin_to_zero():
    det = {"boxes": torch.tensor([[-6.0, -4.0, 20.0, 30.0]]), "class_ids": torch.tensor([1]),
           "scores": torch.tensor([0.9]), "masks": torch.ones(1, 28, 28)}
    out = detections_to_original(det, scale=2.0, window=(0, 0, 100, 80), height=40, width=50)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 0.0, 10.0, 15.0]]))

"""The way back from the canvas to the user's image (pipelines/evaluation/inference.py) by answers worked out by
hand: boxes, masks, categories and scores of two images in original pixels, the score floor met exactly, the
results column `way_back` writes. Pure: no Ray, no model."""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from pipelines.data.categories import CategoryMap
from pipelines.data.coco_results import coco_results_of_batch, pack_detections
from pipelines.evaluation.inference import keep_detections, way_back

COCO_IDS = [1, 3, 9]


def _packed():
    """Two images, detections in canvas pixels (all-ones masks): image 0 is 80 high x 100 wide at scale 0.5
    (window 50 x 40), image 1 is 30 x 20 at scale 2 (window 40 x 60)."""
    dets = [{"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0], [40.123, 30.123, 60.0, 45.0]]),
             "class_ids": torch.tensor([2, 3]), "scores": torch.tensor([0.876543, 0.5]),
             "masks": torch.ones(2, 28, 28)},
            {"boxes": torch.tensor([[4.0, 10.0, 12.0, 30.0]]), "class_ids": torch.tensor([1]),
             "scores": torch.tensor([0.25]), "masks": torch.ones(1, 28, 28)}]
    packed = pack_detections(dets, max_detections=3)
    packed.update(image_id=np.array([7, 8]), scale=np.array([0.5, 2.0]), height=np.array([80, 30]),
                  width=np.array([100, 20]), window=np.array([[0, 0, 50, 40], [0, 0, 40, 60]]))
    return packed


def _box_mask(height, width, x1, y1, x2, y2):
    mask = np.zeros((height, width), np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def test_detections_back_in_original_pixels_by_hand():
    first, second = coco_results_of_batch(_packed(), coco_ids=COCO_IDS)
    assert [r["image_id"] for r in first] == [7, 7] and [r["image_id"] for r in second] == [8]
    assert [r["category_id"] for r in first + second] == [3, 9, 1]  # contiguous k -> coco_ids[k - 1]
    assert [r["score"] for r in first + second] == [0.87654, 0.5, 0.25]  # 5 decimals
    # canvas / scale; the second box runs past the image's right and bottom edges and is clipped to them
    assert first[0]["bbox"] == [20.0, 10.0, 40.0, 40.0] and first[1]["bbox"] == [80.25, 60.25, 19.75, 19.75]
    assert second[0]["bbox"] == [2.0, 5.0, 4.0, 10.0]
    masks = [mask_utils.decode(r["segmentation"]) for r in first + second]
    assert all(isinstance(r["segmentation"]["counts"], str) for r in first + second)  # JSON-ready
    assert np.array_equal(masks[0], _box_mask(80, 100, 20, 10, 60, 50))
    assert np.array_equal(masks[2], _box_mask(30, 20, 2, 5, 6, 15))
    # pasted with the unclipped box (80.25, 60.25, 120, 90): pixel centres from (80.5, 60.5) on, cut at the edges
    assert np.array_equal(masks[1], _box_mask(80, 100, 80, 60, 100, 80))


def test_keep_detections_keeps_scores_at_the_floor_and_at_most_the_limit():
    packed = {"det_count": np.array([4, 2, 3]),
              "det_scores": np.array([[0.9, 0.5, 0.5, 0.1], [0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.0]])}
    keep_detections(packed, min_scores=[0.5, 0.0, 0.75], limits=[4, 4, 1])
    # 0.5 is kept at floor 0.5; padding beyond det_count never counts; the limit cuts after the floor
    assert packed["det_count"].tolist() == [3, 2, 1]
    keep_detections(packed, min_scores=[0.5, 0.0, 0.0], limits=[2, 4, 4])
    assert packed["det_count"].tolist() == [2, 2, 1]
    with pytest.raises(ValueError):  # a floor or a limit per image: one short is a caller's bug, not a shorter batch
        keep_detections(packed, min_scores=[0.5, 0.5], limits=[2, 4, 4])


def test_way_back_writes_each_images_results_as_json_and_carries_the_timings():
    packed = _packed()
    # columns as a block may hold them (int32, float32): written with the dataset's own types
    packed.update(image_id=packed["image_id"].astype(np.int32), decode_s=np.array([0.25, 0.5], np.float32),
                  model_s=np.array([1.5, 2.5], np.float32))
    categories = CategoryMap(coco_ids=tuple(COCO_IDS), names=("a", "b", "c")).to_dict()
    out = way_back(packed, categories=categories)
    assert out["image_id"].tolist() == [7, 8] and out["image_id"].dtype == np.int64
    assert [json.loads(r) for r in out["results"]] == coco_results_of_batch(_packed(), coco_ids=COCO_IDS)
    assert out["results"].dtype == object  # Python strings, not a fixed-width unicode array
    assert out["decode_s"].tolist() == [0.25, 0.5] and out["model_s"].tolist() == [1.5, 2.5]
    assert out["decode_s"].dtype == out["model_s"].dtype == np.float64
    assert out["way_back_s"].shape == (2,) and (out["way_back_s"] >= 0).all()
    assert set(out) == {"image_id", "results", "decode_s", "model_s", "way_back_s"}  # the large columns stay

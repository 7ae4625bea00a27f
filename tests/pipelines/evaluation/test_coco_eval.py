"""COCO evaluation: cocoapi's own known answer (fake100), hand-computed APs, empty and restricted evaluations."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from pipelines.data.coco_metrics import STAT_NAMES, evaluate_detections, pr_curves
from pipelines.evaluation.coco_eval import pr_curve_figure

try:
    import faster_coco_eval  # noqa: F401

    HAVE_FASTER = True
except ImportError:
    HAVE_FASTER = False

needs_faster = pytest.mark.skipif(not HAVE_FASTER, reason="faster-coco-eval is not installed")
BACKENDS = ["pycocotools", pytest.param("faster-coco-eval", marks=needs_faster)]


# ------------------------------------------------------------------------------------------ helpers


def _rect(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _tiny_gt() -> dict:
    """2 images (100 wide, 80 high), 3 instances: image 1 a 30x20 rectangle "cat" (small, area 600) and a
    triangle "dog"; image 2 a 40x30 rectangle "cat" (medium, area 1200). No large objects."""
    triangle = [[60.0, 10.0, 90.0, 10.0, 75.0, 40.0]]
    tri_rle = mask_utils.merge(mask_utils.frPyObjects(triangle, 80, 100))
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rect(10, 10, 30, 20), "area": 600.0,
         "bbox": [10.0, 10.0, 30.0, 20.0], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "segmentation": triangle,
         "area": float(mask_utils.area(tri_rle)), "bbox": [60.0, 10.0, 30.0, 30.0], "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "segmentation": _rect(50, 40, 40, 30), "area": 1200.0,
         "bbox": [50.0, 40.0, 40.0, 30.0], "iscrowd": 0},
    ]  # fmt: skip
    return {
        "images": [{"id": 1, "width": 100, "height": 80, "file_name": "a.jpg"},
                   {"id": 2, "width": 100, "height": 80, "file_name": "b.jpg"}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": anns,
    }  # fmt: skip


def _perfect_detections(gt: dict) -> list[dict]:
    """One detection per gt instance: its own box and the RLE of its own mask, score 1."""
    dets = []
    for ann in gt["annotations"]:
        img = next(i for i in gt["images"] if i["id"] == ann["image_id"])
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], img["height"], img["width"]))
        rle["counts"] = rle["counts"].decode()  # the results format (JSON) has str counts
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": list(ann["bbox"]),
                     "segmentation": rle, "score": 1.0})  # fmt: skip
    return dets


def _box_gt(boxes_xywh: list[list[float]], size=(200, 200)) -> dict:
    """One image, one category, the given gt boxes (their area = w * h)."""
    return {
        "images": [{"id": 7, "width": size[0], "height": size[1], "file_name": "x.jpg"}],
        "categories": [{"id": 3, "name": "thing"}],
        "annotations": [
            {"id": i + 1, "image_id": 7, "category_id": 3, "bbox": b, "area": b[2] * b[3],
             "segmentation": _rect(*b), "iscrowd": 0}
            for i, b in enumerate(boxes_xywh)
        ],
    }  # fmt: skip


def _det(box, score):
    return {"image_id": 7, "category_id": 3, "bbox": list(box), "score": score}


# -------------------------------------------------------------------------- known answers by hand


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_detections_score_one(backend):
    gt = _tiny_gt()
    result = evaluate_detections(gt, _perfect_detections(gt), backend=backend)
    # every AP/AR is 1; the large range has no ground truth, so COCOeval gives -1 there
    expected = [1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0]
    for iou_type in ("bbox", "segm"):
        assert result.stats(iou_type) == pytest.approx(expected), (iou_type, result.stats(iou_type))
        assert result.metrics[f"{iou_type}/AP/cat"] == pytest.approx(1.0)
        assert result.metrics[f"{iou_type}/AP/dog"] == pytest.approx(1.0)
    assert result.num_images == 2 and result.num_detections == 3
    assert result.precision["segm"].shape == (10, 101, 2, 4, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_false_positive_ranked_first_halves_ap(backend):
    # One gt box; a false positive (no overlap) scored 0.9 and an exact hit scored 0.8.
    # Ranked by score: FP, TP -> recall [0, 1], precision [0, 1/2]. COCO makes precision monotone from the
    # right (p[i] = max(p[i], p[i+1])) -> [1/2, 1/2], then reads it at the 101 recall thresholds 0, 0.01, ..., 1:
    # each threshold r takes the first rank whose recall >= r (rank 0 for r = 0, rank 1 otherwise), so all 101
    # values are 1/2 and AP = 0.5 at every IoU threshold (the hit has IoU 1).
    gt = _box_gt([[10.0, 10.0, 40.0, 40.0]])  # area 1600: medium
    dets = [_det([120.0, 120.0, 40.0, 40.0], 0.9), _det([10.0, 10.0, 40.0, 40.0], 0.8)]
    result = evaluate_detections(gt, dets, iou_types=("bbox",), backend=backend)
    m = result.metrics
    assert m["bbox/AP50"] == pytest.approx(0.5, abs=1e-12)
    assert m["bbox/AP75"] == pytest.approx(0.5, abs=1e-12)
    assert m["bbox/AP"] == pytest.approx(0.5, abs=1e-12)
    assert m["bbox/APm"] == pytest.approx(0.5, abs=1e-12)
    assert m["bbox/APs"] == -1 and m["bbox/APl"] == -1
    # maxDets=1 keeps only the top-scored detection, the false positive: recall 0. With 10 or 100: recall 1.
    assert m["bbox/AR1"] == 0.0
    assert m["bbox/AR10"] == pytest.approx(1.0) and m["bbox/AR100"] == pytest.approx(1.0)
    assert m["bbox/AP/thing"] == pytest.approx(0.5, abs=1e-12)
    # the curve the figure draws is the same 0.5 everywhere
    recall, curve, ap = pr_curves(result, "bbox")["IoU=0.50"]
    np.testing.assert_allclose(curve, 0.5)
    assert ap == pytest.approx(0.5) and len(recall) == 101


def test_101_point_interpolation_between_hits():
    # Two gt boxes; detections ranked TP (0.9), FP (0.8), TP (0.7).
    # recall [1/2, 1/2, 1], precision [1, 1/2, 2/3] -> made monotone from the right: [1, 2/3, 2/3].
    # Recall thresholds 0.00..0.50 (51 of them) first reach recall >= r at rank 0 -> precision 1;
    # thresholds 0.51..1.00 (50) at rank 2 -> 2/3. AP = (51 * 1 + 50 * 2/3) / 101 = 0.834983...
    # (an all-point area under the curve would say 0.5 * 1 + 0.5 * 2/3 = 0.8333: COCO's grid differs).
    gt = _box_gt([[10.0, 10.0, 40.0, 40.0], [100.0, 100.0, 40.0, 40.0]])
    dets = [_det([10.0, 10.0, 40.0, 40.0], 0.9), _det([150.0, 10.0, 40.0, 40.0], 0.8),
            _det([100.0, 100.0, 40.0, 40.0], 0.7)]  # fmt: skip
    result = evaluate_detections(gt, dets, iou_types=("bbox",))
    assert result.metrics["bbox/AP50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    assert result.metrics["bbox/AP"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)


def test_partial_overlap_counts_only_below_its_iou():
    # gt 40x40, detection 40x25 sharing its top-left corner: IoU = 1000 / 1600 = 0.625. It is a hit at IoU
    # thresholds 0.50, 0.55, 0.60 (AP 1 each) and a miss at 0.65..0.95 (AP 0): AP@[.5:.95] = 3/10.
    gt = _box_gt([[0.0, 0.0, 40.0, 40.0]])
    result = evaluate_detections(gt, [_det([0.0, 0.0, 40.0, 25.0], 0.5)], iou_types=("bbox",))
    assert result.metrics["bbox/AP50"] == pytest.approx(1.0)
    assert result.metrics["bbox/AP75"] == 0.0
    assert result.metrics["bbox/AP"] == pytest.approx(0.3, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_detections(backend):
    gt = _tiny_gt()
    result = evaluate_detections(gt, [], backend=backend)
    # nothing found: 0 wherever there is ground truth, -1 for the large range that has none
    expected = [0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    assert result.stats("bbox") == expected
    assert result.stats("segm") == expected
    assert result.metrics["bbox/AP/cat"] == 0.0
    assert "Average Precision" in result.tables["bbox"]


def test_image_ids_restrict_evaluation():
    # Perfect detections on image 1 only. Over both images "cat" finds 1 of its 2 instances: precision 1 up to
    # recall 1/2, then nothing -> 51 of the 101 thresholds at precision 1 -> AP 51/101; "dog" AP 1.
    gt = _tiny_gt()
    dets = [d for d in _perfect_detections(gt) if d["image_id"] == 1]
    both = evaluate_detections(gt, dets, iou_types=("bbox",))
    assert both.metrics["bbox/AP/cat"] == pytest.approx(51 / 101, abs=1e-12)
    assert both.metrics["bbox/AP"] == pytest.approx((51 / 101 + 1) / 2, abs=1e-12)
    only_first = evaluate_detections(gt, dets, iou_types=("bbox",), image_ids=[1])
    assert only_first.metrics["bbox/AP"] == pytest.approx(1.0)
    assert only_first.num_images == 1


def test_segm_area_ranges_follow_mask_area_not_box_area():
    # A small gt and two detections: the exact hit (0.9) and, ranked first, a false positive whose MASK is a
    # small 20x20 square elsewhere but whose BOX is large (150x150). Area ranges ignore unmatched detections
    # outside the range. Judged by its mask (as detectron2 does for segm) the false positive is small and counts
    # against APs: FP, TP -> APs = 0.5 (as in test_false_positive_ranked_first_halves_ap). Judged by its box it
    # would be ignored in the small range and APs would read 1.0.
    gt = {
        "images": [{"id": 1, "width": 200, "height": 200, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rect(10, 10, 20, 20),
                         "area": 400.0, "bbox": [10.0, 10.0, 20.0, 20.0], "iscrowd": 0}],
    }  # fmt: skip
    hit = {**_perfect_detections(gt)[0], "score": 0.9}
    fp_gt = copy.deepcopy(gt)
    fp_gt["annotations"][0]["segmentation"] = _rect(150, 150, 20, 20)
    miss = {**_perfect_detections(fp_gt)[0], "bbox": [0.0, 0.0, 150.0, 150.0], "score": 0.95}
    result = evaluate_detections(gt, [hit, miss], iou_types=("segm",))
    assert result.metrics["segm/AP"] == pytest.approx(0.5, abs=1e-12)
    assert result.metrics["segm/APs"] == pytest.approx(0.5, abs=1e-12)
    assert result.metrics["segm/APl"] == -1


def test_inputs_are_not_modified_and_results_json(tmp_path):
    gt = _tiny_gt()
    dets = _perfect_detections(gt)
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    result = evaluate_detections(gt, dets)
    # pycocotools' loadRes writes ids/areas into results and segm eval turns gt polygons into RLE in place
    assert gt == gt_before and dets == dets_before

    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    from_files = evaluate_detections(str(tmp_path / "gt.json"), str(tmp_path / "dets.json"))
    assert from_files.metrics == result.metrics

    # URIs go through pyarrow.fs (s3://, gs:// on a cluster; file:// here)
    from_uris = evaluate_detections(f"file://{tmp_path / 'gt.json'}", f"file://{tmp_path / 'dets.json'}")
    assert from_uris.metrics == result.metrics
    result.to_json(f"file://{tmp_path / 'uri' / 'metrics.json'}")
    assert json.loads((tmp_path / "uri" / "metrics.json").read_text())["metrics"] == result.metrics

    out = result.to_json(tmp_path / "out" / "metrics.json")
    saved = json.loads(open(out).read())
    assert saved["metrics"] == result.metrics
    assert saved["tables"] == result.tables
    assert saved["num_images"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_gt_as_a_pycocotools_coco_object(backend):
    # a COCO object is used as it is by its own backend and converted through its dataset by the other
    import contextlib
    import io

    from pycocotools.coco import COCO

    gt = _tiny_gt()
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    dets = [d for d in _perfect_detections(gt) if d["image_id"] == 1]
    result = evaluate_detections(coco, dets, backend=backend)
    assert result.metrics["bbox/AP"] == pytest.approx((51 / 101 + 1) / 2, abs=1e-12)  # see test_image_ids_...
    assert result.metrics["segm/AP"] == pytest.approx((51 / 101 + 1) / 2, abs=1e-12)


def test_bad_inputs_are_named():
    gt = _tiny_gt()
    good = _perfect_detections(gt)
    with pytest.raises(ValueError, match="category ids not in the ground truth"):
        evaluate_detections(gt, [{**good[0], "category_id": 0}])
    with pytest.raises(ValueError, match="images not in the ground truth"):
        evaluate_detections(gt, [{**good[0], "image_id": 99}])
    with pytest.raises(ValueError, match="no 'segmentation'"):
        evaluate_detections(gt, [{k: v for k, v in good[0].items() if k != "segmentation"}])
    with pytest.raises(ValueError, match="image_ids not in the ground truth"):
        evaluate_detections(gt, good, image_ids=[5])
    with pytest.raises(ValueError, match="unknown backend"):
        evaluate_detections(gt, good, backend="nope")


def test_pr_curve_figure_png(tmp_path):
    gt = _box_gt([[10.0, 10.0, 40.0, 40.0], [100.0, 100.0, 40.0, 40.0]])
    dets = [_det([10.0, 10.0, 40.0, 40.0], 0.9), _det([150.0, 10.0, 40.0, 40.0], 0.8)]
    result = evaluate_detections(gt, dets, iou_types=("bbox",))
    path = pr_curve_figure(result, "bbox", tmp_path / "pr.png", figsize=(4, 3), dpi=50)
    with Image.open(path) as im:
        assert im.size == (200, 150)
    with pytest.raises(KeyError):
        pr_curve_figure(result, "segm", tmp_path / "x.png")


# ----------------------------------------------------------------------- cocoapi's fake100 answer


def _expected_stats(text: str) -> dict[str, list[str]]:
    """{"segm": ["0.320", ...], "bbox": [...]} from cocoapi's val2014_fake_eval_res.txt."""
    out = {}
    for block in text.split("type=")[1:]:
        name = block.split()[0]
        out[name] = re.findall(r"\] = (-?\d+\.\d+)", block)
    return out


@pytest.fixture(scope="module")
def fake100(shared_data):
    folder = shared_data / "cocoapi-fake100"
    if not folder.is_dir():
        pytest.skip("cocoapi-fake100 is absent")
    gt = json.loads((folder / "instances_val2014_100.json").read_text())
    return {
        "gt": gt,
        "bbox": json.loads((folder / "instances_val2014_fakebbox100_results.json").read_text()),
        "segm": json.loads((folder / "instances_val2014_fakesegm100_results.json").read_text()),
        "expected": _expected_stats((folder / "val2014_fake_eval_res.txt").read_text()),
        # cocoapi's demo evaluates imgIds = sorted(cocoGt.getImgIds())[0:100] (here: all 100 images, including
        # the one the fake results skip; that image's misses are part of the expected numbers)
        "image_ids": sorted(img["id"] for img in gt["images"])[:100],
    }


def _evaluate_fake100(fake100, backend):
    return {
        t: evaluate_detections(
            fake100["gt"], fake100[t], iou_types=(t,), backend=backend, image_ids=fake100["image_ids"]
        )
        for t in ("bbox", "segm")
    }


@pytest.fixture(scope="module")
def fake100_reference(fake100):
    return _evaluate_fake100(fake100, "pycocotools")


def test_fake100_matches_cocoapi(fake100, fake100_reference):
    for iou_type in ("bbox", "segm"):
        expected = fake100["expected"][iou_type]
        assert len(expected) == len(STAT_NAMES) == 12
        result = fake100_reference[iou_type]
        got = [f"{v:0.3f}" for v in result.stats(iou_type)]
        assert got == expected, (iou_type, got, expected)
        # the table is summarize()'s own text: the same twelve numbers, in order
        assert re.findall(r"\] = (-?\d+\.\d+)", result.tables[iou_type]) == expected
    assert fake100_reference["bbox"].metrics["bbox/AP"] == pytest.approx(0.505, abs=5e-4)
    assert fake100_reference["segm"].metrics["segm/AP75"] == pytest.approx(0.299, abs=5e-4)


def test_fake100_per_category_and_curves(fake100_reference):
    result = fake100_reference["bbox"]
    per_cat = np.array([result.metrics[f"bbox/AP/{n}"] for n in result.category_names])
    assert len(per_cat) == 80
    # COCO AP is the mean over categories with ground truth of their AP (all have equal weight)
    assert per_cat[per_cat > -1].mean() == pytest.approx(result.metrics["bbox/AP"], abs=1e-12)
    curves = pr_curves(result, "bbox")
    # the mean of a curve over the 101 recall thresholds is the AP COCOeval reports
    assert np.nanmean(curves["IoU=0.50"][1]) == pytest.approx(result.metrics["bbox/AP50"], abs=1e-12)
    assert np.nanmean(curves["IoU=0.50:0.95"][1]) == pytest.approx(result.metrics["bbox/AP"], abs=1e-12)


@needs_faster
def test_fake100_backends_agree(fake100, fake100_reference):
    faster = _evaluate_fake100(fake100, "faster-coco-eval")
    for iou_type in ("bbox", "segm"):
        ref, got = fake100_reference[iou_type], faster[iou_type]
        assert got.backend == "faster-coco-eval"
        # the same numbers up to float summation order
        assert got.metrics.keys() == ref.metrics.keys()
        np.testing.assert_allclose(list(got.metrics.values()), list(ref.metrics.values()), atol=1e-12, rtol=0)
        np.testing.assert_allclose(got.precision[iou_type], ref.precision[iou_type], atol=1e-12, rtol=0)


def test_missing_faster_backend_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        evaluate_detections(_tiny_gt(), [], backend="faster-coco-eval")

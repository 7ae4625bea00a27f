"""COCO evaluation of detections (bbox and segm AP/AR) with pycocotools, or optionally faster-coco-eval.

In the data layer, under training and evaluation both: the `evaluate` stage and the quick evaluation of each
validation in training (pipelines/training/hooks/ap_eval.py) use it. pipelines/evaluation/coco_eval.py adds the
precision-recall figure and is where the stages import it from.

    result = evaluate_detections("annotations/instances_val2017.json", detections, image_ids=predicted_ids)
    result.metrics["bbox/AP"], result.metrics["segm/AP50"], result.metrics["bbox/AP/person"]
    print(result.tables["segm"])          # exactly what COCOeval.summarize() prints
    result.to_json("out/metrics.json")

Detections are in the COCO results format, one dict per detection, in ORIGINAL image pixels:
`image_id`, `category_id` (the COCO id, not the contiguous class index), `bbox` [x, y, w, h], `score`,
and for segm `segmentation`, a compressed RLE `{"size": [h, w], "counts": str}`.

Details that change the numbers, done as detectron2 does them:
- bbox is evaluated without the masks and segm without the boxes. Given both, pycocotools' `loadRes` takes a
  result's area from its box, so segm's small/medium/large split would follow box areas, not mask areas.
- The images evaluated are `image_ids` when given (e.g. only the images that were predicted, `--limit`),
  else every image of the ground truth: an image with ground truth and no detection counts as all misses.
- An empty detection list is evaluated (pycocotools' `loadRes` fails on one): every AP/AR with ground truth
  in its area range is 0, the others -1, which is what COCOeval reports for a detector that finds nothing.
- Per-category AP: AP@[.5:.95], area all, maxDets 100, the mean of `eval["precision"][:, :, k, 0, -1]` over
  its entries > -1; -1 for a category without ground truth in the evaluated images (COCOeval's convention).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.infra.storage import read_bytes, write_bytes

__all__ = [
    "BACKENDS",
    "STAT_NAMES",
    "CocoEvalResult",
    "evaluate_detections",
    "pr_curves",
]


# COCOeval.stats order for bbox / segm (summarize() prints them in this order)
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


BACKENDS = ("pycocotools", "faster-coco-eval")


IOU_TYPES = ("bbox", "segm")


@dataclass
class CocoEvalResult:
    """What `evaluate_detections` found.

    metrics: "<iou_type>/<stat>" for the 12 STAT_NAMES and "<iou_type>/AP/<category name>", floats
        (-1 where COCOeval has nothing to average, e.g. APl without large ground truth).
    tables: iou_type -> the text COCOeval.summarize() printed.
    precision: iou_type -> COCOeval's eval["precision"], [T, R, K, A, M] = IoU thresholds x recall thresholds
        x categories (sorted COCO ids) x area ranges (all, small, medium, large) x maxDets (1, 10, 100);
        -1 where a category has no ground truth.
    """

    metrics: dict[str, float]
    tables: dict[str, str]
    precision: dict[str, np.ndarray] = field(repr=False)
    iou_thresholds: np.ndarray = field(default_factory=lambda: np.linspace(0.5, 0.95, 10), repr=False)
    recall_thresholds: np.ndarray = field(default_factory=lambda: np.linspace(0.0, 1.0, 101), repr=False)
    category_ids: list[int] = field(default_factory=list)
    category_names: list[str] = field(default_factory=list)
    backend: str = "pycocotools"
    num_images: int = 0
    num_detections: int = 0

    @property
    def iou_types(self) -> list[str]:
        return list(self.tables)

    def stats(self, iou_type: str) -> list[float]:
        """The 12 stats of one iou type in COCOeval.stats order."""
        return [self.metrics[f"{iou_type}/{name}"] for name in STAT_NAMES]

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "metrics": self.metrics,
            "tables": self.tables,
        }

    def to_json(self, path: str | os.PathLike) -> str:
        """Write metrics.json: {"backend", "num_images", "num_detections", "metrics", "tables"} (local path
        or URI). The precision arrays are not written (see `pr_curve_figure`)."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=True)
        return write_bytes(path, (text + "\n").encode())


def _backend_module(backend: str):
    """(COCO class, COCOeval class) of a backend."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster-coco-eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as e:
            raise ImportError(
                "backend 'faster-coco-eval' needs the optional package faster-coco-eval "
                "(pip install faster-coco-eval); use backend='pycocotools' otherwise"
            ) from e
        return COCO, COCOeval_faster
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def _load_gt_dataset(gt: Any) -> dict[str, Any]:
    """The ground truth as a COCO dataset dict, from a path/URI, a dict or a COCO object of either backend."""
    if isinstance(gt, (str, os.PathLike)):
        return json.loads(read_bytes(gt))
    if isinstance(gt, dict):
        # segm evaluation rewrites gt annotations in place (polygons -> RLE, an "ignore" flag):
        # copy the annotation dicts so the caller's dict is left as it was
        return {**gt, "annotations": [dict(a) for a in gt.get("annotations", [])]}
    if hasattr(gt, "dataset") and isinstance(gt.dataset, dict):
        return _load_gt_dataset(gt.dataset)
    raise TypeError(f"gt must be a path, a dict or a COCO object, got {type(gt).__name__}")


def _coco_from_dataset(coco_cls: type, dataset: dict[str, Any]):
    coco = coco_cls()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def _ground_truth(gt: Any, coco_cls: type):
    # a COCO object of the chosen backend is used as it is (already indexed, maybe large)
    if not isinstance(gt, (str, os.PathLike, dict)) and isinstance(gt, coco_cls):
        return gt
    return _coco_from_dataset(coco_cls, _load_gt_dataset(gt))


def _load_detections(detections: list[dict[str, Any]] | str | os.PathLike) -> list[dict[str, Any]]:
    if isinstance(detections, (str, os.PathLike)):
        detections = json.loads(read_bytes(detections))
    if not isinstance(detections, list):
        raise TypeError(f"detections must be a list of dicts (COCO results format), got {type(detections).__name__}")
    return detections


def _results_for(detections: Sequence[dict[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Fresh result dicts for one iou type (loadRes writes ids and areas into them): bbox without the
    mask, segm without the box, so each area comes from what is evaluated (see the module docstring)."""
    geometry = "bbox" if iou_type == "bbox" else "segmentation"
    out = []
    for i, det in enumerate(detections):
        if geometry not in det:
            raise ValueError(
                f"detection {i} has no {geometry!r}: {iou_type} evaluation needs it "
                f"(pass iou_types=('bbox',) for box-only detections)"
            )
        value = det[geometry]
        if geometry == "segmentation":
            if not (isinstance(value, dict) and "counts" in value and "size" in value):
                raise ValueError(f"detection {i}: segmentation must be a compressed RLE {{'size', 'counts'}}")
            counts = value["counts"]
            value = {"size": list(value["size"]), "counts": counts.decode() if isinstance(counts, bytes) else counts}
        else:
            value = [float(v) for v in value]
        out.append(
            {
                "image_id": int(det["image_id"]),
                "category_id": int(det["category_id"]),
                geometry: value,
                "score": float(det["score"]),
            }
        )
    return out


def _check_ids(detections: Sequence[dict[str, Any]], coco_gt: Any, image_ids: Iterable[int] | None) -> list[int]:
    """Image ids to evaluate; fails early, naming the ids, on what pycocotools would assert on or skip."""
    gt_images = set(coco_gt.getImgIds())
    gt_categories = set(coco_gt.getCatIds())
    unknown_images = sorted({int(d["image_id"]) for d in detections} - gt_images)
    if unknown_images:
        raise ValueError(f"detections on images not in the ground truth: {unknown_images[:10]}")
    unknown_categories = sorted({int(d["category_id"]) for d in detections} - gt_categories)
    if unknown_categories:
        # the usual cause: contiguous class indices passed where COCO category ids are expected
        raise ValueError(
            f"detections with category ids not in the ground truth: {unknown_categories[:10]} "
            "(expected COCO category ids, not contiguous class indices)"
        )
    if image_ids is None:
        return sorted(gt_images)
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        raise ValueError("image_ids is empty: nothing to evaluate")
    missing = sorted(set(ids) - gt_images)
    if missing:
        raise ValueError(f"image_ids not in the ground truth: {missing[:10]}")
    return ids


def _empty_results(coco_cls: type, coco_gt: Any):
    """What loadRes would return for no detections (it raises IndexError on an empty list instead)."""
    return _coco_from_dataset(
        coco_cls,
        {
            "info": copy.deepcopy(coco_gt.dataset.get("info", {})),
            "images": list(coco_gt.dataset["images"]),
            "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
            "annotations": [],
        },
    )


def _run_cocoeval(eval_cls: type, backend: str, coco_gt: Any, coco_dt: Any, iou_type: str, image_ids: list[int]):
    """COCOeval evaluate/accumulate/summarize; returns (evaluator, the text summarize() printed)."""
    quiet = io.StringIO()
    if backend == "pycocotools":
        evaluator = eval_cls(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = image_ids
        with contextlib.redirect_stdout(quiet):  # "Running per image evaluation..." and timings
            evaluator.evaluate()
            evaluator.accumulate()
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            evaluator.summarize()
        return evaluator, table.getvalue()
    # faster-coco-eval reports through a print_function instead of stdout
    evaluator = eval_cls(coco_gt, coco_dt, iou_type, print_function=lambda *_: None)
    evaluator.params.imgIds = image_ids
    evaluator.evaluate()
    evaluator.accumulate()
    lines: list[str] = []
    evaluator.print_function = lambda line: lines.append(str(line))
    evaluator.summarize()
    return evaluator, "".join(line + "\n" for line in lines)


def _mean_valid(values: np.ndarray) -> float:
    """Mean of the entries > -1 (COCOeval's -1 marks "no ground truth"); -1 when there are none."""
    valid = values[values > -1]
    if valid.size == 0:
        return -1.0
    mean = float(np.mean(valid))
    return -1.0 if np.isnan(mean) else mean


def evaluate_detections(
    gt: Any,
    detections: list[dict[str, Any]] | str | os.PathLike,
    *,
    iou_types: Sequence[str] = IOU_TYPES,
    backend: str = "pycocotools",
    image_ids: Iterable[int] | None = None,
) -> CocoEvalResult:
    """Evaluate COCO-format detections against a COCO ground truth.

    gt: the original annotations file (local path or URI), its dict, or a COCO object (pycocotools' or
        faster-coco-eval's; one of the chosen backend is used as it is, and segm evaluation converts its
        polygons to RLE in place, as pycocotools does).
    detections: list of {"image_id", "category_id" (COCO id), "bbox" [x, y, w, h] original pixels, "score",
        "segmentation" compressed RLE with str counts (segm only)}, or a results JSON file (path or URI).
        Not modified. May be empty.
    iou_types: any of "bbox", "segm".
    backend: "pycocotools" (reference) or "faster-coco-eval" (optional package, same numbers, faster).
    image_ids: evaluate only these images (default: all images of the ground truth).
    """
    iou_types = tuple(iou_types)
    if not iou_types or any(t not in IOU_TYPES for t in iou_types):
        raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}")
    coco_cls, eval_cls = _backend_module(backend)
    coco_gt = _ground_truth(gt, coco_cls)
    detections = _load_detections(detections)
    ids = _check_ids(detections, coco_gt, image_ids)
    cat_ids = sorted(coco_gt.getCatIds())
    cat_names = [str(c.get("name", c["id"])) for c in coco_gt.loadCats(cat_ids)]

    metrics: dict[str, float] = {}
    tables: dict[str, str] = {}
    precision: dict[str, np.ndarray] = {}
    iou_thrs = recall_thrs = None
    for iou_type in iou_types:
        results = _results_for(detections, iou_type)
        if results:
            with contextlib.redirect_stdout(io.StringIO()):  # "Loading and preparing results..."
                coco_dt = coco_gt.loadRes(results)
        else:
            coco_dt = _empty_results(coco_cls, coco_gt)
        evaluator, tables[iou_type] = _run_cocoeval(eval_cls, backend, coco_gt, coco_dt, iou_type, ids)
        stats = np.asarray(evaluator.stats, dtype=np.float64)[: len(STAT_NAMES)]
        metrics.update({f"{iou_type}/{name}": float(v) for name, v in zip(STAT_NAMES, stats, strict=True)})

        params = evaluator.params
        prec = np.asarray(evaluator.eval["precision"], dtype=np.float64)  # [T, R, K, A, M]
        precision[iou_type] = prec
        iou_thrs, recall_thrs = np.asarray(params.iouThrs), np.asarray(params.recThrs)
        area_all = list(params.areaRngLbl).index("all")
        max_100 = list(params.maxDets).index(100)
        for k, name in enumerate(cat_names):
            metrics[f"{iou_type}/AP/{name}"] = _mean_valid(prec[:, :, k, area_all, max_100])

    return CocoEvalResult(
        metrics=metrics,
        tables=tables,
        precision=precision,
        iou_thresholds=iou_thrs,
        recall_thresholds=recall_thrs,
        category_ids=cat_ids,
        category_names=cat_names,
        backend=backend,
        num_images=len(ids),
        num_detections=len(detections),
    )


def pr_curves(result: CocoEvalResult, iou_type: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Precision-recall curves averaged over categories (area all, maxDets 100):
    {"IoU=0.50": (recall [R], precision [R], AP), "IoU=0.75": ..., "IoU=0.50:0.95": ...}.

    At each recall threshold the precision is the mean over the categories (and, for 0.50:0.95, the IoU
    thresholds) with ground truth, so the mean of a curve is the AP that COCOeval reports. Points where no
    category has ground truth are NaN.
    """
    prec = result.precision[iou_type][:, :, :, 0, -1]  # [T, R, K] area all, maxDets 100
    thresholds = np.asarray(result.iou_thresholds)
    recall = np.asarray(result.recall_thresholds)
    curves = {}
    for label, sel in (
        ("IoU=0.50", np.isclose(thresholds, 0.5)),
        ("IoU=0.75", np.isclose(thresholds, 0.75)),
        ("IoU=0.50:0.95", np.ones_like(thresholds, dtype=bool)),
    ):
        p = prec[sel]  # [t, R, K]
        valid = p > -1
        count = valid.sum(axis=(0, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            curve = np.where(count > 0, np.where(valid, p, 0.0).sum(axis=(0, 2)) / count, np.nan)
        curves[label] = (recall, curve, _mean_valid(p))
    return curves

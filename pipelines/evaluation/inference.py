"""Batch inference in three stages, shared by `evaluate` (Ray Data) and `predict` (in-process):

    decode_inputs     shard rows -> network inputs                       CPU tasks
    ModelStage        network inputs -> the model's own outputs, packed  actor pool, one model each (GPU or CPU)
    way_back          packed outputs -> COCO results JSON, original px   CPU tasks

Only the model's outputs cross from the model actor: per image at most D = detection.max_detections boxes,
scores, classes and the M x M mask probabilities (M = mask.mask_size), padded to D so that every batch is a
fixed-shape array (Ray Data stores them as tensor columns). Pasting the masks at original resolution and RLE
encoding them (the costly part on a CPU at COCO sizes) happen in the way-back tasks, so a GPU actor does
nothing but run the model.

Packed outputs (one batch of N images):
    det_count   int64   [N]            detections of each image (rows past it are padding)
    det_boxes   float32 [N, D, 4]      (x1, y1, x2, y2) padded-image pixels
    det_scores  float32 [N, D]
    det_classes int64   [N, D]         contiguous class ids (>= 1)
    det_masks   float32 [N, D, M, M]   probabilities of the predicted class
plus what the way back needs, carried through: image_id, scale (float64), window int64 [N, 4], height, width.

The packing and the way back (`pack_detections`, `run_model`, `unpack_detections`, `to_coco_results`,
`coco_results_of_batch`) are pipelines/data/coco_results.py's, where training's quick evaluation at each
validation uses them too; imported here as before.

Every stage adds its time per image (`decode_s`, `model_s`, `way_back_s`), summed by the driver for the
where-the-time-goes report. Importable without Ray, MLflow or pycocotools (pycocotools: inside `to_coco_results`).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mrcnn.geometry import resize_geometry, resize_image
from pipelines.data.categories import CategoryMap
from pipelines.data.coco_results import coco_results_of_batch, run_model
from pipelines.data.shards import decode_row
from pipelines.models import ModelSpec, load_model

PACKED = ("det_count", "det_boxes", "det_scores", "det_classes", "det_masks")
CARRIED = ("image_id", "scale", "window", "height", "width")  # what the way back needs besides the outputs
TIMINGS = ("decode_s", "model_s", "way_back_s")
# (images uint8 [N, 3, S, S], windows int64 [N, 4]) -> the packed outputs: an eager model (`eager_runner`) or an
# exported one (`pipelines.evaluation.onnx_export.OnnxModel`)
Runner = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def decode_inputs(rows: dict[str, np.ndarray], *, image_size: int) -> dict[str, np.ndarray]:
    """Shard rows -> network inputs: images uint8 [N, 3, S, S] (image at the top-left, zero padding), window
    int64 [N, 4], image_id, scale float64, height, width (original), decode_s. Each row goes through the shared
    `decode_row` (without num_anchors: no RPN targets are built), so evaluation sees the images exactly as
    training does."""
    start = time.perf_counter()
    n = len(rows["image_id"])
    out = {
        "images": np.zeros((n, 3, image_size, image_size), np.uint8),
        "window": np.zeros((n, 4), np.int64),
        "image_id": np.zeros(n, np.int64),
        "scale": np.zeros(n, np.float64),
        "height": np.zeros(n, np.int64),
        "width": np.zeros(n, np.int64),
    }
    for i in range(n):
        row = decode_row({k: v[i] for k, v in rows.items()})
        image = row["image"]  # [h, w, 3] uint8, unpadded
        h, w = image.shape[:2]
        out["images"][i, :, :h, :w] = image.transpose(2, 0, 1)  # (h, w, 3) -> (3, h, w)
        out["window"][i] = row["window"]
        for key in ("image_id", "scale", "height", "width"):
            out[key][i] = row[key]
    out["decode_s"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
    return out





class ModelStage:
    """Callable class for `map_batches` on an actor pool: network inputs -> packed model outputs (and the
    carried columns). Holds one model; `threads` sets torch's intra-op threads on a CPU actor."""

    def __init__(self, *, spec: ModelSpec, min_confidence: float, use_gpu: bool, threads: int | None = None):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if threads and self.device.type == "cpu":
            torch.set_num_threads(int(threads))
        self.model = load_model(spec, device=self.device, min_confidence=min_confidence)
        self.max_detections = int(self.model.detection_settings.max_detections)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = run_model(self.model, batch["images"], batch["window"], self.device, max_detections=self.max_detections)
        n = len(batch["image_id"])
        out["model_s"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        for key in (*CARRIED, "decode_s"):
            out[key] = batch[key]
        return out




def network_input(image: np.ndarray, *, min_dim: int, max_dim: int) -> tuple[np.ndarray, Any]:
    """[H, W, 3] uint8 original -> ([3, S, S] uint8 canvas, Geometry): resized by `mrcnn.geometry.resize_image`
    (the loader's resize), top-left, zero padding."""
    height, width = image.shape[:2]
    geo = resize_geometry(height, width, min_dim=min_dim, max_dim=max_dim)
    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # (h, w, 3) -> (3, h, w)
    canvas = np.zeros((3, max_dim, max_dim), np.uint8)
    canvas[:, : geo.new_h, : geo.new_w] = resize_image(chw, geo.new_h, geo.new_w).numpy()
    return canvas, geo


def keep_detections(packed: dict[str, np.ndarray], *, min_scores: list[float], limits: list[int]) -> None:
    """Trim each image's detections in place to those scoring at least min_scores[i], at most limits[i] of them:
    the model's detections are by decreasing score, so the kept ones are the first and only det_count changes.
    On a model loaded at min_confidence 0 this gives what the model loaded at min_scores[i] gives: NMS is per class
    and greedy by score (a lower-scored box never suppresses a higher one) and the per-image cut keeps the best."""
    for i, (floor, limit) in enumerate(zip(min_scores, limits, strict=True)):
        k = int(packed["det_count"][i])
        packed["det_count"][i] = min(int((packed["det_scores"][i, :k] >= floor).sum()), limit)


def eager_runner(model: torch.nn.Module, device: torch.device) -> Runner:
    """An eager model as a `Runner` (`run_model` with its device and detection limit), the contract that
    `onnx_export.OnnxModel` keeps too."""
    return functools.partial(run_model, model, device=device,
                             max_detections=int(model.detection_settings.max_detections))


def detect_images(run: Runner, originals: list[np.ndarray], *, image_ids: list[int], min_dim: int, max_dim: int,
                  coco_ids: list[int], min_scores: list[float] | None = None,
                  limits: list[int] | None = None) -> list[list[dict[str, Any]]]:
    """Decoded images ([H, W, 3] uint8 RGB each, original size) -> each image's COCO results in original pixels:
    `network_input`, the model (`run`: an `eager_runner` or an exported model), `coco_results_of_batch` in one
    call, what `predict` and the server both run.
    min_scores / limits: per image, `keep_detections` before the way back (default: the model's own)."""
    prepared = [network_input(im, min_dim=min_dim, max_dim=max_dim) for im in originals]
    packed = run(np.stack([c for c, _ in prepared]), np.asarray([g.window for _, g in prepared], np.int64))
    max_detections = packed["det_scores"].shape[1]
    if min_scores is not None or limits is not None:
        n = len(originals)
        keep_detections(packed, min_scores=min_scores if min_scores is not None else [0.0] * n,
                        limits=limits if limits is not None else [max_detections] * n)
    packed.update(image_id=np.asarray(image_ids, np.int64),
                  scale=np.asarray([g.scale for _, g in prepared], np.float64),
                  window=np.asarray([g.window for _, g in prepared], np.int64),
                  height=np.asarray([im.shape[0] for im in originals], np.int64),
                  width=np.asarray([im.shape[1] for im in originals], np.int64))
    return coco_results_of_batch(packed, coco_ids=coco_ids)


def way_back(batch: dict[str, np.ndarray], *, categories: dict[str, Any]) -> dict[str, np.ndarray]:
    """Function for task-based `map_batches`: packed outputs -> image_id, results (one COCO-results JSON
    string per image) and the three timings; the large columns stay behind."""
    start = time.perf_counter()
    coco_ids = list(CategoryMap.from_dict(categories).coco_ids)
    results = [json.dumps(r) for r in coco_results_of_batch(batch, coco_ids=coco_ids)]
    n = len(results)
    return {
        "image_id": np.asarray(batch["image_id"], np.int64),
        "results": np.asarray(results, dtype=object),
        "decode_s": np.asarray(batch["decode_s"], np.float64),
        "model_s": np.asarray(batch["model_s"], np.float64),
        "way_back_s": np.full(n, (time.perf_counter() - start) / max(n, 1)),
    }

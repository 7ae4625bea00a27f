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

from mrcnn.detections import detections_to_original
from mrcnn.geometry import resize_geometry, resize_image
from pipelines.data.categories import CategoryMap
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


def pack_detections(detections: list[dict[str, torch.Tensor]], *, max_detections: int) -> dict[str, np.ndarray]:
    """The model's eval output (one dict per image: boxes [D, 4], class_ids [D], scores [D], masks [D, M, M])
    -> the packed arrays of the module docstring, padded to `max_detections`, with one transfer to the host per
    array (not one per image)."""
    n = len(detections)
    d = max_detections
    counts = [len(det["boxes"]) for det in detections]
    if counts and max(counts) > d:
        raise ValueError(f"an image has {max(counts)} detections, more than max_detections {d}")
    ref = detections[0]["masks"] if n else torch.zeros(0, 1, 1)
    m = ref.shape[-1]
    device = ref.device
    boxes = torch.zeros(n, d, 4, device=device)
    scores = torch.zeros(n, d, device=device)
    classes = torch.zeros(n, d, dtype=torch.int64, device=device)
    masks = torch.zeros(n, d, m, m, device=device)
    for i, det in enumerate(detections):
        k = counts[i]
        boxes[i, :k] = det["boxes"].float()
        scores[i, :k] = det["scores"].float()
        classes[i, :k] = det["class_ids"]
        masks[i, :k] = det["masks"].float()
    return {
        "det_count": np.asarray(counts, np.int64),
        "det_boxes": boxes.cpu().numpy(),
        "det_scores": scores.cpu().numpy(),
        "det_classes": classes.cpu().numpy(),
        "det_masks": masks.cpu().numpy(),
    }


def unpack_detections(batch: dict[str, np.ndarray], i: int) -> dict[str, torch.Tensor]:
    """Image i of a packed batch -> the model's eval dict (CPU tensors), padding dropped."""
    k = int(batch["det_count"][i])
    # Ray Data hands out read-only views of its blocks: writable contiguous copies for torch (a tensor over a
    # read-only array is undefined behaviour if written, and torch warns)
    return {
        key: torch.from_numpy(np.require(batch[column][i, :k], requirements=["C", "W"]))
        for key, column in (("boxes", "det_boxes"), ("scores", "det_scores"), ("class_ids", "det_classes"),
                            ("masks", "det_masks"))
    }


def run_model(model: torch.nn.Module, images: np.ndarray, windows: np.ndarray, device: torch.device,
              *, max_detections: int) -> dict[str, np.ndarray]:
    """images uint8 [N, 3, S, S], windows int64 [N, 4] -> the packed outputs (eval mode, no grad)."""
    batch = {"images": torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device),
             "windows": torch.from_numpy(np.require(windows, requirements=["C", "W"])).to(device)}
    with torch.no_grad():
        detections = model(batch)
    return pack_detections(detections, max_detections=max_detections)


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


def to_coco_results(
    det: dict[str, torch.Tensor],
    *,
    image_id: int,
    scale: float,
    window: list[int],
    height: int,
    width: int,
    coco_ids: list[int],
) -> list[dict[str, Any]]:
    """One image's detections (padded-image frame) -> COCO results: bbox [x, y, w, h] and RLE masks in
    original image pixels, COCO category ids."""
    import pycocotools.mask as mask_util

    original = detections_to_original(
        {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in det.items()},
        scale=scale,
        window=tuple(window),
        height=height,
        width=width,
    )
    boxes = original["boxes"].numpy()
    masks = original["masks"].numpy().astype(np.uint8)
    out = []
    for j in range(len(boxes)):
        x1, y1, x2, y2 = (float(v) for v in boxes[j])
        rle = mask_util.encode(np.asfortranarray(masks[j]))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append(
            {
                "image_id": image_id,
                "category_id": int(coco_ids[int(original["class_ids"][j]) - 1]),
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(original["scores"][j]), 5),
                "segmentation": rle,
            }
        )
    return out


def coco_results_of_batch(batch: dict[str, np.ndarray], *, coco_ids: list[int]) -> list[list[dict[str, Any]]]:
    """A packed batch (with the carried columns) -> each image's COCO results, in original pixels."""
    return [
        to_coco_results(
            unpack_detections(batch, i),
            image_id=int(batch["image_id"][i]),
            scale=float(batch["scale"][i]),
            window=[int(v) for v in batch["window"][i]],
            height=int(batch["height"][i]),
            width=int(batch["width"][i]),
            coco_ids=coco_ids,
        )
        for i in range(len(batch["image_id"]))
    ]


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

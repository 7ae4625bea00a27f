"""The model's detections as COCO results, shared by evaluation (`evaluate`, `predict`, `serve`: through
pipelines/evaluation/inference.py, which describes the packed outputs) and training's quick evaluation at each
validation (pipelines/training/hooks/ap_eval.py): the model's eval output packed into fixed-shape arrays
(`pack_detections`, `run_model`), and back per image (`unpack_detections`) to COCO results in original pixels
with RLE masks (`to_coco_results`, `coco_results_of_batch`).

Packed outputs (one batch of N images; D = detection.max_detections, M = mask.mask_size):
    det_count   int64   [N]            detections of each image (rows past it are padding)
    det_boxes   float32 [N, D, 4]      (x1, y1, x2, y2) padded-image pixels
    det_scores  float32 [N, D]
    det_classes int64   [N, D]         contiguous class ids (>= 1)
    det_masks   float32 [N, D, M, M]   probabilities of the predicted class
plus what the way back needs: image_id, scale (float64), window int64 [N, 4], height, width.

Importable without pycocotools (inside `to_coco_results`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mrcnn.detections import detections_to_original


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

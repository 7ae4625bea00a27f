"""`mrcnn-cli predict`: a model on any JPEG / PNG files, no shards needed.

The model carries its config and category names (a checkpoint's meta.json, or an MLflow model's
`mrcnn_meta`), so each image goes through the same geometry as training: resized with
`mrcnn.geometry.resize_geometry` and `resize_image` (the loader's resize), placed at the top-left of the zero
S x S canvas, detected in eval mode, and mapped back to original pixels: the model and the way back are evaluate's
(`inference.run_model`, `inference.coco_results_of_batch`), run in this process.

Output folder:
    predictions.json   COCO results: image_id, category_id (COCO ids), bbox [x, y, w, h] and RLE segmentation
                       in original pixels, score
    images.json        the COCO "images" entries of the inputs: id, file_name, height, width (and path)
    NAME.png           per image: masks, boxes, class names and scores drawn on the original image

Image ids are the file names' numbers when every name is a distinct number (COCO's 000000397133.jpg -> 397133,
so the results evaluate against the COCO annotations), otherwise 1..N in sorted path order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from mrcnn.config import Config
from pipelines.data.categories import CategoryMap
from pipelines.data.coco import load_image_rgb
from pipelines.data.errors import MissingInputError
from pipelines.evaluation.inference import Runner, detect_images, eager_runner
from pipelines.infra.storage import write_bytes
from pipelines.models import load_model, model_spec
from pipelines.pictures import draw_instances, save_figure

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


HEADER_PX = 36  # the picture's title band


MAX_PICTURE_PX = 1024  # a picture's long side at most this (small images are enlarged up to 4x)


@dataclass
class PredictResult:
    out: str
    predictions: str  # path of predictions.json
    pictures: list[str]
    images: list[dict[str, Any]]  # the COCO "images" entries
    num_detections: int


def find_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files given, plus the JPEG / PNG files directly inside folders given; sorted, without duplicates."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            found.append(item)
        else:
            raise MissingInputError(f"no such image file or folder: {item}")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise MissingInputError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {', '.join(map(str, inputs))}")
    return sorted(unique)


def image_ids(paths: list[Path]) -> list[int]:
    """The numbers in the file names when they are all distinct numbers, otherwise 1..N."""
    stems = [p.stem for p in paths]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(paths) + 1))


def predict_images(inputs: list[str | os.PathLike], model_path: str | None, out: str | os.PathLike, *,
                   threshold: float | None = None, device: str | torch.device | None = None,
                   batch_size: int | None = None, tracking_uri: str | None = None,
                   overrides: list[str] | tuple[str, ...] = (), config_path: str | None = None,
                   onnx: str | os.PathLike | None = None) -> PredictResult:
    """Run the model of `model_path` (checkpoint directory or MLflow model URI), or the exported model `onnx` in
    onnxruntime (`pipelines.evaluation.onnx_export`; then model_path is None), on the images in `inputs` (files or
    folders); write predictions.json, images.json and one picture per image into `out`.

    threshold: keep detections scoring at least this (default the model's detection.min_confidence).
    overrides / config_path: the command's --set / --config (inference settings only: `pipelines.models.model_spec`).
    """

    paths = find_images(inputs)
    ids = image_ids(paths)
    config, categories, min_score, run = _runner(model_path, onnx, threshold=threshold, device=device,
                                                 tracking_uri=tracking_uri, overrides=overrides,
                                                 config_path=config_path)
    coco_ids = list(categories.coco_ids)
    names = dict(zip(coco_ids, categories.names, strict=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    pictures: list[str] = []
    used: set[str] = set()
    step = batch_size or config.evaluate.batch_size
    for first in range(0, len(paths), step):
        chunk = list(zip(paths[first : first + step], ids[first : first + step], strict=True))
        originals = [load_image_rgb(p) for p, _ in chunk]
        found_each = detect_images(run, originals, image_ids=[i for _, i in chunk], min_dim=config.image.min_dim,
                                   max_dim=config.image.max_dim, coco_ids=coco_ids)
        for (path, image_id), image, found in zip(chunk, originals, found_each, strict=True):
            height, width = image.shape[:2]
            results.extend(found)
            images.append({"id": image_id, "file_name": path.name, "height": height, "width": width,
                           "path": str(path)})
            name = path.stem if path.stem not in used else f"{path.stem}_{image_id}"
            used.add(name)
            title = f"{path.name}: {len(found)} detections (score >= {min_score:g})"
            pictures.append(detections_picture(image, found, names, out / f"{name}.png", title=title))

    predictions = out / "predictions.json"
    write_bytes(predictions, json.dumps(results).encode())
    write_bytes(out / "images.json", json.dumps(images, indent=1).encode())
    return PredictResult(str(out), str(predictions), pictures, images, len(results))


def _runner(model_path: str | None, onnx: str | os.PathLike | None, *, threshold: float | None,
            device: str | torch.device | None, tracking_uri: str | None, overrides: list[str] | tuple[str, ...],
            config_path: str | None) -> tuple[Config, CategoryMap, float, Runner]:
    """(config, categories, minimum score, runner) of the eager model of `model_path` or of the exported `onnx`
    file (an exported model carries its settings: --set / --config apply to `model_path` only)."""
    if onnx is not None:
        from pipelines.evaluation.onnx_export import OnnxModel

        exported = OnnxModel(onnx, min_confidence=threshold)
        meta = exported.meta
        return meta.config, CategoryMap.from_dict(meta.categories), exported.min_confidence, exported
    spec = model_spec(model_path, tracking_uri=tracking_uri, overrides=overrides, config_path=config_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(spec, device=device, min_confidence=threshold)
    return (spec.config, CategoryMap.from_dict(spec.categories), model.detection_settings.min_confidence,
            eager_runner(model, device))


def detections_picture(image: np.ndarray, results: list[dict[str, Any]], names: dict[int, str],
                       path: str | os.PathLike, *, title: str = "") -> str:
    """One image's COCO results (original pixels, RLE masks) drawn on it, under a title band; returns the path.

    The image is shown at zoom z = min(4, MAX_PICTURE_PX / max(H, W)): the PNG is round(W * z) x
    (round(H * z) + HEADER_PX) pixels.
    """
    import pycocotools.mask as mask_util


    height, width = image.shape[:2]
    zoom = min(4.0, MAX_PICTURE_PX / max(height, width))
    w_px, h_px = round(width * zoom), round(height * zoom)
    fig = Figure(figsize=(w_px / 100, (h_px + HEADER_PX) / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, h_px / (h_px + HEADER_PX)))
    boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in results)]).reshape(-1, 4)
    masks = np.stack([mask_util.decode(r["segmentation"]).astype(bool) for r in results]) if results else None
    draw_instances(ax, image, boxes=boxes, masks=masks, labels=[names.get(r["category_id"], "?") for r in results],
                   scores=[r["score"] for r in results])
    fig.text(4 / w_px, 1 - 4 / (h_px + HEADER_PX), title, ha="left", va="top", fontsize=8, wrap=True)
    return save_figure(fig, path)

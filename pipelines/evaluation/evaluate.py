"""`mrcnn-cli evaluate`: batch inference over a split's shards and COCO evaluation with pycocotools.

Inference runs in Ray Data `map_batches` on an actor pool (one model per actor, one GPU each when there are
GPUs); each actor maps its detections back to original image pixels and COCO category ids and encodes masks
as RLE, so what reaches the driver is COCO results JSON, small. The driver runs COCOeval against the
original annotations file recorded in the manifest and logs metrics, tables and pictures to MLflow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrcnn.anchors import anchors_from_config
from mrcnn.config import DetectionConfig, EvalConfig
from mrcnn.detections import detections_to_original
from pipelines.data.categories import CategoryMap
from pipelines.data.coco import load_image_rgb, safe_image_path
from pipelines.data.errors import DatasetError
from pipelines.data.loader import ShardBatchDecoder, decoder_for, read_split
from pipelines.data.shards import read_manifest
from pipelines.evaluation.coco_eval import evaluate_detections, pr_curve_figure
from pipelines.infra import tracking
from pipelines.infra.logs import get_logger
from pipelines.infra.ray_env import cluster_has_gpus, init_ray
from pipelines.infra.storage import read_bytes
from pipelines.models import ModelSpec, check_model_fits, load_model, model_spec
from pipelines.pictures import predictions_grid

log = get_logger("evaluate")


@dataclass(frozen=True)
class EvaluateRequest:
    shards: str
    model_path: str  # a checkpoint directory, an MLflow model URI (runs:/..., models:/...) or torchvision:FILE
    split: str = "val2017"
    annotations: str | None = None  # default: the one recorded in the manifest
    workers: int = 1
    use_gpu: bool | None = None
    limit: int | None = None
    out: str = "eval_out"
    backend: str = "pycocotools"
    address: str | None = None
    tracking_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    parent_run_id: str | None = None
    run_name: str | None = None
    pictures: int = 8
    # the detection layer's and the evaluation's settings; None: the model's own (what it was trained with)
    detection: DetectionConfig | None = None
    settings: EvalConfig | None = None


@dataclass
class EvaluateResult:
    metrics: dict[str, float]
    out: str
    run_id: str
    table: str


class Predictor:
    """Callable class for `map_batches`: shard rows -> one COCO-results JSON string per image."""

    def __init__(self, *, spec: ModelSpec, min_confidence: float, use_gpu: bool):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_model(spec, device=self.device, min_confidence=min_confidence)
        self.coco_ids = list(CategoryMap.from_dict(spec.categories).coco_ids)
        self.decoder = ShardBatchDecoder(**decoder_for(spec.config, int(anchors_from_config(spec.config).shape[0])))

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = {k: torch.as_tensor(v) for k, v in self.decoder(rows).items()}
        with torch.no_grad():
            detections = self.model({k: v.to(self.device) for k, v in batch.items()})
        results = []
        for i, det in enumerate(detections):
            results.append(
                json.dumps(
                    to_coco_results(
                        det,
                        image_id=int(batch["image_ids"][i]),
                        scale=float(batch["scales"][i]),
                        window=batch["windows"][i].tolist(),
                        height=int(batch["heights"][i]),
                        width=int(batch["widths"][i]),
                        coco_ids=self.coco_ids,
                    )
                )
            )
        return {"image_id": np.asarray(rows["image_id"], np.int64), "results": np.asarray(results, dtype=object)}


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


def predict_split(
    shards: str, split: str, spec: ModelSpec, *, workers: int, use_gpu: bool, limit: int | None
) -> list[dict[str, Any]]:
    import ray.data


    ds = read_split(shards, split)
    if limit:
        ds = ds.limit(limit)
    results = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "spec": spec,
            "min_confidence": spec.config.evaluate.min_confidence,
            "use_gpu": use_gpu,
        },
        batch_size=spec.config.evaluate.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    detections: list[dict[str, Any]] = []
    image_ids: list[int] = []
    # detections are small JSON per image; iterate rather than materialise the decoded images
    for row in results.select_columns(["image_id", "results"]).iter_rows():
        image_ids.append(int(row["image_id"]))
        detections.extend(json.loads(row["results"]))
    return detections, sorted(image_ids)


def evaluate(request: EvaluateRequest) -> EvaluateResult:
    manifest = read_manifest(request.shards)
    spec = model_spec(request.model_path, categories=manifest["categories"],  # (a torchvision file's: the shards')
                      tracking_uri=request.tracking_uri)
    check_model_fits(spec, manifest)
    if spec.torchvision:  # a file that does not fit is refused here, naming its keys, not in each inference actor
        load_model(spec)
    if request.detection or request.settings:  # the caller's detection / evaluation settings over the model's
        spec = replace(spec, config=replace(spec.config, detection=request.detection or spec.config.detection,
                                            evaluate=request.settings or spec.config.evaluate))
    split_info = manifest["splits"].get(request.split)
    if split_info is None:
        raise ValueError(f"split {request.split!r} is not in {request.shards}")
    annotations = request.annotations or split_info["annotations"]

    init_ray(request.address)
    use_gpu = cluster_has_gpus() if request.use_gpu is None else request.use_gpu
    detections, image_ids = predict_split(
        request.shards, request.split, spec, workers=request.workers, use_gpu=use_gpu, limit=request.limit
    )
    result = evaluate_detections(annotations, detections, image_ids=image_ids, backend=request.backend)

    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "metrics.json", result.metrics)
    _write_json(out / "detections.json", detections)
    table = "\n".join(f"{iou_type}:\n{text}" for iou_type, text in result.tables.items())
    (out / "stats.txt").write_text(table)
    for iou_type in result.tables:
        pr_curve_figure(result, iou_type, out / f"pr_curve_{iou_type}.png")
    _prediction_pictures(request, spec, manifest, detections, out / "predictions.png")

    tracking_uri = tracking.resolve_tracking_uri(request.tracking_uri)
    run_id = tracking.create_run(
        tracking_uri,
        experiment=request.experiment,
        run_name=request.run_name or f"evaluate-{request.split}",
        parent_run_id=request.parent_run_id,
        tags={"stage": "evaluate", "shards": request.shards, "model": request.model_path, "annotations": annotations},
    )
    tracking.log_params(
        tracking_uri,
        run_id,
        {"split": request.split, "limit": request.limit or 0, "backend": request.backend,
         "fingerprint": manifest["fingerprint"], "images": len(image_ids)},
    )
    tracking.log_metrics(tracking_uri, run_id, {k.replace("/", "_"): v for k, v in result.metrics.items()})
    tracking.log_artifact(tracking_uri, run_id, out, "evaluation")
    tracking.finish_run(tracking_uri, run_id)
    return EvaluateResult(metrics=result.metrics, out=str(out), run_id=run_id, table=table)


def _prediction_pictures(request, spec: ModelSpec, manifest, detections, path: Path) -> None:
    """A grid of predictions (masks, boxes, class names, scores) on the first images, in original pixels."""
    import pycocotools.mask as mask_util


    split_info = manifest["splits"][request.split]
    categories = CategoryMap.from_dict(spec.categories)
    names = dict(zip(categories.coco_ids, categories.names, strict=True))
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    files = _image_files(split_info.get("annotations"))
    items, unreadable = [], []
    for image_id in sorted(files)[: request.pictures]:
        try:
            image = load_image_rgb(safe_image_path(split_info["images_root"], files[image_id]))
        except DatasetError as exc:  # pictures are a courtesy: an unreadable image is said, evaluation goes on
            unreadable.append(f"image {image_id}: {exc}")
            continue
        dets = [d for d in by_image.get(image_id, []) if d["score"] >= spec.config.detection.min_confidence]
        boxes = np.asarray([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (d["bbox"] for d in dets)]).reshape(-1, 4)
        masks = np.stack([mask_util.decode(d["segmentation"]).astype(bool) for d in dets]) if dets else None
        items.append(
            {
                "image": image,
                "boxes": boxes,
                "masks": masks,
                "labels": [names.get(d["category_id"], str(d["category_id"])) for d in dets],
                "scores": np.asarray([d["score"] for d in dets]),
                "title": f"image {image_id}",
            }
        )
    if unreadable:
        log.warning("%d of %d images left out of the prediction pictures: %s", len(unreadable),
                    len(unreadable) + len(items), "; ".join(unreadable[:3]))
    if items:
        predictions_grid(items, path)


def _image_files(annotations: str | None) -> dict[int, str]:
    """{image id: file name} of the annotations file (a path or URI) that the manifest names."""
    if not annotations:
        return {}
    data = json.loads(read_bytes(annotations))
    return {int(img["id"]): img["file_name"] for img in data.get("images", [])}


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)

"""`mrcnn-cli evaluate`: batch inference over a split's shards and COCO evaluation with pycocotools.

Inference is a Ray Data pipeline of three stages with their own resources (`inference.py`): shard rows are
decoded on CPU tasks, the model runs in an actor pool (one model per actor, one GPU each when there are
GPUs) and sends back only its own outputs (boxes, scores, classes, 28 x 28 mask probabilities), and CPU tasks
map them back to original pixels and COCO category ids and encode the masks as RLE, so what reaches the
driver is COCO results JSON, small. The driver logs images done / total and images/s while it runs, then
runs COCOeval against the original annotations file recorded in the manifest and logs metrics, tables and
pictures to MLflow.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mrcnn.config import DetectionConfig, EvalConfig
from pipelines.data.categories import CategoryMap
from pipelines.data.coco import load_image_rgb, safe_image_path
from pipelines.data.coco_metrics import evaluate_detections
from pipelines.data.errors import DatasetError
from pipelines.data.shardset import ShardSet
from pipelines.evaluation.coco_eval import pr_curve_figure
from pipelines.evaluation.inference import TIMINGS, ModelStage, decode_inputs, way_back
from pipelines.infra import tracking
from pipelines.infra.context import RunContext
from pipelines.infra.logs import get_logger
from pipelines.infra.ray_env import largest_node_cpus, one_node_task_concurrency, usable_cpus
from pipelines.infra.storage import read_bytes, write_atomic, write_bytes
from pipelines.models import ModelSpec, check_model_fits, load_model, model_spec
from pipelines.pictures import predictions_grid

log = get_logger("evaluate")


@dataclass(frozen=True)
class EvaluateRequest:
    """What `mrcnn-cli evaluate` was asked. Where it runs and reports (Ray, MLflow, inference actors as
    `workers`, GPUs) is the run context's."""

    shards: str
    model_path: str  # a checkpoint directory, an MLflow model URI (runs:/..., models:/...) or torchvision:FILE
    split: str = "val2017"
    annotations: str | None = None  # default: the one recorded in the manifest
    limit: int | None = None
    out: str = "eval_out"
    backend: str = "pycocotools"
    run_name: str | None = None
    pictures: int = 8
    # the detection layer's and the evaluation's settings; None: the model's own (what it was trained with)
    detection: DetectionConfig | None = None
    settings: EvalConfig | None = None
    # the command's --set / --config for the model (inference settings only: pipelines.models.model_spec)
    overrides: tuple[str, ...] = ()
    config_path: str | None = None


@dataclass
class EvaluateResult:
    metrics: dict[str, float]
    out: str
    run_id: str
    table: str
    # seconds per image: decode_s, model_s, way_back_s (the stages' own time), coco_eval_s, and wall_s of the
    # inference (images / wall_s is the inference's images/s)
    timings: dict[str, float] = field(default_factory=dict)


def predict_split(
    shards: ShardSet, split: str, spec: ModelSpec, *, workers: int, use_gpu: bool, limit: int | None,
    total: int | None = None,
) -> tuple[list[dict[str, Any]], list[int], dict[str, float]]:
    """Detections (COCO results, original pixels) of a split's images, the image ids, and the seconds the
    stages spent per image ({"decode_s", "model_s", "way_back_s"}: sums over the images, and "wall_s").

    decode (CPU tasks) -> ModelStage (actor pool, one model each, a GPU each when use_gpu) -> way back (CPU
    tasks). The detections are sorted by image id (each image's in the model's order, by decreasing score), so
    COCOeval's ties break the same way however Ray ordered the blocks."""
    import ray
    import ray.data

    settings = spec.config.evaluate
    batch_size = settings.batch_size
    ds = shards.dataset(split)
    if limit:
        ds = ds.limit(limit)
    # blocks of one batch (a streaming split, no barrier): a map task emits its output block when its input block
    # is done, so with a shard file as one block the way back would wait for the model to finish the whole file
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    model_cpus = 1 if use_gpu else model_actor_cpus(usable_cpus(), workers,
                                                    largest_node=largest_node_cpus())
    tasks = one_node_task_concurrency()  # one node: as many decode / way-back processes as cores, no more
    inputs = ds.map_batches(decode_inputs, fn_kwargs={"image_size": spec.config.image.max_dim},
                            batch_size=batch_size, batch_format="numpy", num_cpus=0.5, concurrency=tasks)
    outputs = inputs.map_batches(
        ModelStage,
        fn_constructor_kwargs={"spec": spec, "min_confidence": settings.min_confidence, "use_gpu": use_gpu,
                               "threads": model_cpus},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if use_gpu else 0,
        num_cpus=model_cpus,
    )
    results = outputs.map_batches(way_back, fn_kwargs={"categories": spec.categories}, batch_size=batch_size,
                                  batch_format="numpy", num_cpus=0.5, concurrency=tasks)
    by_image: dict[int, list[dict[str, Any]]] = {}
    seconds = dict.fromkeys(TIMINGS, 0.0)
    progress = Progress(total)
    for row in results.iter_rows():  # small JSON per image; the images and masks never reach the driver
        by_image[int(row["image_id"])] = json.loads(row["results"])
        for key in TIMINGS:
            seconds[key] += float(row[key])
        progress.step()
    seconds["wall_s"] = progress.done()
    image_ids = sorted(by_image)
    return [d for i in image_ids for d in by_image[i]], image_ids, seconds


def model_actor_cpus(cluster_cpus: int, workers: int, *, largest_node: float) -> int:
    """CPUs (and torch threads) of each CPU model actor: the cluster's CPUs but one (for the decode and way-back
    tasks) shared by the `workers` actors, and never more than a node holds with one left over: an actor that fits
    on no node is never placed, and the stage would wait forever (2-CPU nodes of a 4-CPU cluster did)."""
    share = (cluster_cpus - 1) // max(1, workers)
    per_node = int(largest_node) - 1 if largest_node >= 2 else 1
    return max(1, min(share, per_node))


class Progress:
    """Images done / total and images/s through the `evaluate` logger, at most every `every` seconds."""

    def __init__(self, total: int | None, every: float = 10.0):
        self.total, self.every, self.count = total, every, 0
        self.start = self.last = time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.count += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._say(now)

    def done(self) -> float:
        now = time.perf_counter()
        self._say(now)
        return now - self.start

    def _say(self, now: float) -> None:
        of = f"/{self.total}" if self.total else ""
        log.info("inference: %d%s images, %.2f images/s", self.count, of, self.count / max(now - self.start, 1e-9))


def evaluate(request: EvaluateRequest, ctx: RunContext) -> EvaluateResult:
    """Evaluate the model of `request` on a split of its shards, on `ctx`'s cluster (`ctx.workers` inference
    actors), logged to an MLflow run in `ctx.experiment` under `ctx.parent_run_id`."""
    shards = ShardSet.open(request.shards)
    manifest = shards.manifest
    spec = model_spec(request.model_path, categories=manifest["categories"],  # (a torchvision file's: the shards')
                      tracking_uri=ctx.tracking_uri, overrides=request.overrides, config_path=request.config_path)
    check_model_fits(spec, manifest)
    if spec.source.kind == "torchvision":  # a file that does not fit is refused here, not in each inference actor
        load_model(spec)
    if request.detection or request.settings:  # the caller's detection / evaluation settings over the model's
        spec = replace(spec, config=replace(spec.config, detection=request.detection or spec.config.detection,
                                            evaluate=request.settings or spec.config.evaluate))
    split_info = shards.split(request.split)
    annotations = request.annotations or split_info["annotations"]

    ctx.start_ray()
    use_gpu = ctx.gpus()
    total = split_info.get("num_images")
    total = min(total, request.limit) if total and request.limit else (total or request.limit)
    detections, image_ids, seconds = predict_split(
        shards, request.split, spec, workers=ctx.workers, use_gpu=use_gpu, limit=request.limit,
        total=total,
    )
    start = time.perf_counter()
    result = evaluate_detections(annotations, detections, image_ids=image_ids, backend=request.backend)
    seconds["coco_eval_s"] = time.perf_counter() - start
    n = max(len(image_ids), 1)
    timings = {key: value / n for key, value in seconds.items()}
    log.info("%d images, %.2f images/s; per image: decode %.3f s, model %.3f s, way back + RLE %.3f s (the stages' "
             "own time), COCOeval %.3f s", len(image_ids), len(image_ids) / max(seconds["wall_s"], 1e-9),
             timings["decode_s"], timings["model_s"], timings["way_back_s"], timings["coco_eval_s"])

    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "metrics.json", result.metrics)
    _write_json(out / "detections.json", detections)
    table = "\n".join(f"{iou_type}:\n{text}" for iou_type, text in result.tables.items())
    write_bytes(out / "stats.txt", table.encode())
    for iou_type in result.tables:
        pr_curve_figure(result, iou_type, out / f"pr_curve_{iou_type}.png")
    _prediction_pictures(request, spec, manifest, detections, out / "predictions.png")

    tracking_uri = ctx.mlflow_uri()
    run_id = ctx.create_run(request.run_name or f"evaluate-{request.split}",
                            {"stage": "evaluate", "shards": request.shards, "model": request.model_path,
                             "annotations": annotations})
    tracking.log_params(
        tracking_uri,
        run_id,
        {"split": request.split, "limit": request.limit or 0, "backend": request.backend,
         "fingerprint": manifest["fingerprint"], "images": len(image_ids)},
    )
    tracking.log_metrics(tracking_uri, run_id, {k.replace("/", "_"): v for k, v in result.metrics.items()})
    tracking.log_artifact(tracking_uri, run_id, out, "evaluation")
    tracking.finish_run(tracking_uri, run_id)
    return EvaluateResult(metrics=result.metrics, out=str(out), run_id=run_id, table=table, timings=timings)


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
    write_atomic(path, json.dumps(value, indent=1).encode())

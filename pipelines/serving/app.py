"""The Serve application: an ingress deployment (FastAPI) that checks and decodes each request, and a model
deployment that runs batches of images through the model with `@serve.batch`.

    HTTP -> Ingress (FastAPI; requests.py: content type, body, pixel limit, decode, query ranges)
         -> ModelDeployment.detect (serve.batch: up to max_batch images a call; `inference.detect_images`, the
            decode-resize-model-way-back of predict) -> COCO results in original pixels -> the JSON answer

The model is loaded at detection.min_confidence 0 and each request's own threshold (default the model's) and
max_detections are applied to its detections before the way back (`inference.keep_detections`): for the same image
and threshold the answer equals what `predict` writes. A request that fails in a batch is rerun alone, so it fails
only itself. Every answer carries the header X-Batch-Size: the number of images in the model call it went through.

`app_builder(args)` builds the application from plain arguments: `serve deploy` / `serve run` call it through the
config file `mrcnn-cli serve --write-config` writes (import_path pipelines.serving.app:app_builder).
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations, and through
# serve.ingress a postponed `request: Request` was not resolved (it became a required query parameter).
import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipelines.data.categories import CategoryMap
from pipelines.infra.logs import get_logger
from pipelines.models import ModelSpec
from pipelines.serving.options import ServeOptions
from pipelines.serving.requests import FIELD, IMAGE_TYPES, MULTIPART, RequestError, check_query, decode_request

log = get_logger("serve")

api = FastAPI(title="mrcnn-pipeline", description="Mask R-CNN instance segmentation: POST an image, get its "
                                                  "detections as COCO results (boxes and RLE masks).")


@api.exception_handler(RequestValidationError)
async def _bad_query(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own checks (a query value that is not a number) answer in our error form too."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": problems}, status_code=422)


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


PREDICT_BODY = {"requestBody": {"required": True, "content": {
    **{kind: {"schema": {"type": "string", "format": "binary"}} for kind in IMAGE_TYPES},
    MULTIPART: {"schema": {"type": "object", "required": [FIELD],
                           "properties": {FIELD: {"type": "string", "format": "binary"}}}}}}}


THRESHOLD = "Minimum score in [0, 1]; default the model's detection.min_confidence."
LIMIT = "At most this many detections (>= 0, at most the model's detection.max_detections); default the model's."


def answer_batch(run: Callable[[list[Any]], list[Any]], requests: list[Any]) -> list[dict[str, Any]]:
    """run(requests) -> each request's {"results": ..., "batch": len(requests)}; when the batch fails, each request
    is run alone, so that a request the model cannot take fails only itself: {"error": ..., "status": 422} for an
    image the model's geometry refuses (a ValueError, e.g. one so thin that it resizes to 0 pixels), else 500."""
    try:
        found: list[Any] = run(requests)
    except Exception:
        log.warning("a batch of %d failed; its requests are run one by one", len(requests), exc_info=True)
        found = []
        for request in requests:
            try:
                found.append(run([request])[0])
            except ValueError as exc:
                found.append({"error": f"the model cannot take this image: {exc}", "status": 422})
            except Exception as exc:
                log.exception("a request failed")
                found.append({"error": f"the model failed on this image: {type(exc).__name__}: {exc}", "status": 500})
    return [f if isinstance(f, dict) else {"results": f, "batch": len(requests)} for f in found]


@serve.deployment
class ModelDeployment:
    """One model per replica; `detect` takes a list of requests (serve.batch) and returns a list of the same length:
    per request its COCO results, or {"error": ...} for a request whose image failed alone."""

    def __init__(self, spec: ModelSpec, *, max_batch: int, batch_wait_s: float, use_gpu: bool, threads: int | None):
        import torch

        from pipelines.evaluation.inference import eager_runner
        from pipelines.models import load_model

        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if threads and device.type == "cpu":
            torch.set_num_threads(int(threads))
        self.spec = spec
        self.run = eager_runner(load_model(spec, device=device, min_confidence=0.0), device)
        self.coco_ids = list(CategoryMap.from_dict(spec.categories).coco_ids)
        self.batch_sizes: Counter[int] = Counter()
        self.detect.set_max_batch_size(max_batch)
        self.detect.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # both set from the options in __init__
    async def detect(self, requests: list[tuple[Any, float, int]]) -> list[dict[str, Any]]:
        """requests: (pixels [H, W, 3] uint8, score threshold, max detections) each -> {"results": [...],
        "batch": size} or {"error": ...}. The model runs in a thread: the replica's event loop keeps queueing the
        requests that arrive meanwhile, which fill the next batch."""
        self.batch_sizes[len(requests)] += 1
        return await asyncio.to_thread(answer_batch, self._run, requests)

    def _run(self, requests: list[tuple[Any, float, int]]) -> list[list[dict[str, Any]]]:
        from pipelines.evaluation.inference import detect_images

        image = self.spec.config.image
        return detect_images(self.run, [r[0] for r in requests], image_ids=[0] * len(requests),
                             min_dim=image.min_dim, max_dim=image.max_dim, coco_ids=self.coco_ids,
                             min_scores=[r[1] for r in requests], limits=[r[2] for r in requests])

    def stats(self) -> dict[str, Any]:
        """This replica's batch sizes seen: {size: calls}."""
        return {"batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP in and out: checks and decodes a request (requests.py), sends the image to the model deployment and
    answers in JSON; a bad request gets a 4xx {"error": ...} and never reaches the model."""

    def __init__(self, model: DeploymentHandle, info: dict[str, Any], *, max_pixels: int, max_body_bytes: int):
        self.model, self.info = model, info
        self.names = {c["id"]: c["name"] for c in info["categories"]}
        self.max_pixels, self.max_body_bytes = max_pixels, max_body_bytes

    @api.get("/v1/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model_info(self) -> dict[str, Any]:
        """The model served (source, preset, fingerprint, categories, detection defaults) and the batch sizes one
        model replica has seen."""
        return {**self.info, "replica_stats": await self.model.stats.remote()}

    @api.post("/v1/predict", openapi_extra=PREDICT_BODY)
    async def predict(self, request: Request, score_threshold: float | None = Query(None, description=THRESHOLD),
                      max_detections: int | None = Query(None, description=LIMIT)) -> JSONResponse:
        """The image's detections: category_id, category, score, bbox [x, y, w, h] and segmentation (COCO RLE) in the
        image's own pixels, best first."""
        try:
            check_query(score_threshold, max_detections)
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                raise RequestError(413, f"body of {length} bytes, more than the limit {self.max_body_bytes}")
            body = await request.body()
            if len(body) > self.max_body_bytes:
                raise RequestError(413, f"body of {len(body)} bytes, more than the limit {self.max_body_bytes}")
            pixels = await asyncio.to_thread(decode_request, body, request.headers.get("content-type"),
                                             max_pixels=self.max_pixels)
        except RequestError as exc:
            return _error(exc)
        defaults = self.info["detection"]
        threshold = defaults["min_confidence"] if score_threshold is None else score_threshold
        limit = defaults["max_detections"] if max_detections is None else min(max_detections,
                                                                                defaults["max_detections"])
        out = await self.model.detect.remote((pixels, threshold, limit))
        if "error" in out:
            return JSONResponse({"error": out["error"]}, status_code=out["status"])
        answer = {"width": int(pixels.shape[1]), "height": int(pixels.shape[0]),
                  "model": {"source": self.info["source"], "fingerprint": self.info["fingerprint"]},
                  "detections": [{"category_id": r["category_id"], "category": self.names.get(r["category_id"]),
                                  "score": r["score"], "bbox": r["bbox"], "segmentation": r["segmentation"]}
                                 for r in out["results"]]}
        return JSONResponse(answer, headers={"X-Batch-Size": str(out["batch"])})


def model_info(spec: ModelSpec) -> dict[str, Any]:
    """What GET /v1/model says of the model: source, preset, fingerprint (sha256 of its whole config, 16 hex digits),
    categories (COCO ids and names), the detection defaults requests fall back on."""
    config = spec.config
    categories = CategoryMap.from_dict(spec.categories)
    blob = json.dumps(config.to_dict(), sort_keys=True).encode()
    return {"source": spec.location, "preset": config.name, "fingerprint": hashlib.sha256(blob).hexdigest()[:16],
            "categories": [{"id": int(c), "name": n} for c, n in zip(categories.coco_ids, categories.names,
                                                                      strict=True)],
            "image": {"min_dim": config.image.min_dim, "max_dim": config.image.max_dim},
            "detection": {"min_confidence": config.detection.min_confidence,
                          "max_detections": config.detection.max_detections}}


def build_app(options: ServeOptions, spec: ModelSpec, *, threads: int | None = None):
    """The application (`serve.run` takes it): the model deployment with the options' replicas or autoscaling, one
    GPU a replica with use_gpu, else `threads` CPUs (and torch threads) each; the ingress in front of it."""
    if options.use_gpu:
        resources: dict[str, float] = {"num_gpus": 1, "num_cpus": 1}
    else:
        resources = {"num_cpus": threads or 1}
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.autoscale is not None:
        low, high = options.autoscale
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "initial_replicas": low,
                                          "target_ongoing_requests": options.max_batch}}
    model = ModelDeployment.options(
        # at least twice the batch: a full batch in the model and the next one filling meanwhile
        max_ongoing_requests=2 * options.max_batch, ray_actor_options=resources, **scaling,
    ).bind(spec, max_batch=options.max_batch, batch_wait_s=options.batch_wait_ms / 1000, use_gpu=options.use_gpu,
           threads=None if options.use_gpu else threads)
    return Ingress.options(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=max(100, 4 * options.max_batch)
                           ).bind(model, model_info(spec), max_pixels=options.max_pixels,
                                  max_body_bytes=options.max_body_bytes)


def app_builder(args: dict[str, Any]):
    """`serve deploy` / `serve run`'s entry: args are ServeOptions' fields (`ServeOptions.to_args`)."""
    options = ServeOptions.from_args(args)
    return build_app(options, options.spec(), threads=options.cpus_per_replica)

"""`mrcnn-cli inspect STAGE`: every sub-net's work as a picture, one PNG per stage, numbers printed on it.

Stages (`STAGES`), each a plain function `*_picture(..., path) -> dict` of the numbers it printed:

    gt                 the image as stored (resized, padded) with its gt masks, boxes and class names
    anchors            anchors at a few positions of every level; total and per-level counts
    rpn-targets        positive / negative / ignored anchors against the gt boxes, before and after sampling
    mini-masks         per instance: original mask, mini-mask, mini-mask expanded back, and their IoU
    deltas             positive anchors, and the boxes their stored deltas decode to (they land on the gt)
    proposals, detection-targets, predictions, batch     the model's and the trainer's stages, in
                       pipelines/inspection/model_stages.py (batch: a training batch exactly as the trainer receives it)

The image comes from the shards (`--shards --split`, the row the trainer reads) or straight from a COCO split
(`--dataset --split`), whose record goes through `pipelines.data.rows.RowMaker`, the code that writes the
shards; `batch` needs the shards. `run_inspect` dispatches, writes `all` into a folder and logs to MLflow.

Layout: a title band of TITLE_PX holding the numbers, then a grid of square panels, each with a caption band
of CAPTION_PX above it. A panel is `panel_px(S)` pixels for an S x S input: an integer multiple of S up to
PANEL_PX (one image pixel = an exact block of PNG pixels), PANEL_PX for larger inputs. So a picture of R x C
panels is `picture_size(R, C, panel_px(S))` = (C * panel, TITLE_PX + R * (CAPTION_PX + panel)) PNG pixels.
Boxes are (x1, y1, x2, y2) in padded-image pixels unless stated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mrcnn.config import Config
from pipelines.data.errors import InputError
from pipelines.data.shardset import ShardSet
from pipelines.infra import tracking
from pipelines.infra.context import RunContext
from pipelines.inspection import model_stages as inspect_model
from pipelines.inspection.data_stages import (
    anchors_picture,
    deltas_picture,
    gt_picture,
    mini_masks_picture,
    rpn_targets_picture,
)
from pipelines.inspection.samples import load_sample
from pipelines.models import check_model_fits, model_spec

STAGES = ("gt", "anchors", "rpn-targets", "mini-masks", "deltas", "proposals", "detection-targets", "batch",
          "predictions")


MODEL_STAGES = ("proposals", "detection-targets", "predictions")


@dataclass(frozen=True)
class InspectRequest:
    """What `mrcnn-cli inspect` was asked; the MLflow store and experiment are the run context's."""

    stage: str  # one of STAGES, or "all"
    out: str  # the PNG; a folder for "all" (one STAGE.png each)
    shards: str | None = None
    dataset: str | None = None
    split: str = "val2017"
    image_id: int | None = None
    index: int = 0
    model_path: str | None = None  # checkpoint directory, MLflow model URI or torchvision:FILE; None: untrained
    config: Config | None = None  # for --dataset without a model, and anchors without data; default coco
    threshold: float | None = None
    step: int = 0  # the train step whose flips `batch` shows
    seed: int = 0
    mlflow_run: str | None = None
    # --set with a model: its inference settings (pipelines.models.model_spec refuses any other)
    model_overrides: tuple[str, ...] = ()


def run_inspect(request: InspectRequest, ctx: RunContext) -> dict[str, Any]:
    """Write the stage's picture (every stage's, into a folder, for "all"); returns {stage: numbers}, and
    "mlflow_run" when the pictures were logged (to --mlflow-run, or to a new run in `ctx.experiment` for "all").
    Under "all" a stage that cannot be drawn (batch without shards, original annotations out of reach) is
    {"skipped": why}."""

    if request.stage not in (*STAGES, "all"):
        raise InputError(f"unknown stage {request.stage!r}: one of {', '.join(STAGES)}, all")
    stages = STAGES if request.stage == "all" else (request.stage,)
    uses_model = any(s in MODEL_STAGES for s in stages)
    spec = None
    shards = ShardSet.open(request.shards) if request.shards else None
    manifest = shards.manifest if shards else None
    if request.model_path and uses_model:
        # a torchvision file's classes are the shards' (COCO's 80 without shards)
        spec = model_spec(request.model_path, categories=manifest["categories"] if manifest else None,
                          tracking_uri=ctx.tracking_uri, overrides=request.model_overrides)
        if manifest:
            check_model_fits(spec, manifest)
    # the shards' own config unless a model's (just checked to share their geometry)
    config = spec.config if spec else (None if request.shards else request.config)
    sample = None
    if request.shards or request.dataset or any(s not in ("anchors", "batch") for s in stages):
        sample = load_sample(shards=shards, dataset=request.dataset, split=request.split,
                             image_id=request.image_id, index=request.index, config=config)
        config = sample.config
    run = inspect_model.model_run(sample, spec=spec, threshold=request.threshold, seed=request.seed) \
        if uses_model else None
    seed = request.seed
    draw = {
        "gt": lambda p: gt_picture(sample, p),
        "anchors": lambda p: anchors_picture(config or Config(), p, sample),
        "rpn-targets": lambda p: rpn_targets_picture(sample, p, seed=seed),
        "mini-masks": lambda p: mini_masks_picture(sample, p),
        "deltas": lambda p: deltas_picture(sample, p),
        "proposals": lambda p: inspect_model.proposals_picture(run, p),
        "detection-targets": lambda p: inspect_model.detection_targets_picture(run, p, seed=seed),
        "batch": lambda p: inspect_model.batch_picture(shards, request.split, p, index=request.index,
                                                       step=request.step, config=config),
        "predictions": lambda p: inspect_model.predictions_picture(run, p),
    }
    results: dict[str, Any] = {}
    for stage in stages:
        if request.stage != "all":
            if stage == "batch" and not request.shards:
                raise InputError("stage 'batch' shows the loader's output: give --shards")
            results[stage] = draw[stage](request.out)
        elif stage == "batch" and not request.shards:
            results[stage] = {"skipped": "needs --shards"}
        else:
            try:
                results[stage] = draw[stage](os.path.join(request.out, f"{stage}.png"))
            except (ValueError, OSError) as exc:  # one stage out of reach must not cost the others
                results[stage] = {"skipped": f"{type(exc).__name__}: {exc}"}
    if request.mlflow_run or request.stage == "all":

        uri = ctx.mlflow_uri()
        run_id = request.mlflow_run or ctx.create_run(
            "inspect", {"stage": "inspect", "source": sample.source if sample else "config"})
        for info in results.values():
            if "path" in info:
                tracking.log_artifact(uri, run_id, info["path"], "inspect")
        if not request.mlflow_run:
            tracking.finish_run(uri, run_id)
        results["mlflow_run"] = run_id
    return results

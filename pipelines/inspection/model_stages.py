"""`mrcnn-cli inspect` stages that run the model or the trainer's code: proposals, detection-targets,
predictions, and batch (a training batch exactly as the trainer receives it, flips included).

The model's stages take a `ModelRun` (a model, the image as a one-image Batch, and the features computed once);
each writes one PNG laid out as in `pipelines.inspection.panels`. Without `--model-path` the model is freshly
initialised (seeded) and every title says "untrained model". The model runs in eval mode, so BatchNorm uses its running
statistics.
Boxes are (x1, y1, x2, y2) in padded-image pixels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from mrcnn.anchors import anchors_from_config, flip_permutation_from_config
from mrcnn.box_coder import decode
from mrcnn.config import Config
from mrcnn.detections import paste_masks_in_image
from mrcnn.flip import flip_batch
from mrcnn.model import build_model
from pipelines.data.categories import CategoryMap
from pipelines.data.loader import ShardBatchDecoder, decoder_for, densify_rpn_deltas
from pipelines.data.shardset import ShardSet
from pipelines.inspection.panels import (
    GT,
    NEGATIVE,
    POSITIVE,
    Picture,
    draw_boxes,
    panel_px,
    rgb,
    show_image,
    subsample,
    text_panel,
)
from pipelines.inspection.samples import Sample, expanded_masks
from pipelines.models import ModelMismatchError, load_model
from pipelines.pictures import draw_instances
from pipelines.training.step import StepRunner

TOP_PROPOSALS = 20  # drawn with their scores


@dataclass
class ModelRun:
    """A model and one image: batch on the model's device, features (pyramid, objectness, rpn deltas) once."""

    model: Any
    sample: Sample
    label: str  # "untrained model" or "model PATH", printed in every title
    _features: tuple | None = field(default=None, repr=False)
    _batch: dict | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.model.anchors.device

    @property
    def batch(self) -> dict[str, torch.Tensor]:
        if self._batch is None:
            self._batch = {k: v.to(self.device) for k, v in self.sample.batch().items()}
        return self._batch

    @property
    def features(self) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        if self._features is None:
            with torch.no_grad():
                self._features = self.model.eval().features(self.batch["images"])
        return self._features


def model_run(sample: Sample, *, spec: Any = None, threshold: float | None = None, seed: int = 0,
              device: str | torch.device | None = None) -> ModelRun:
    """The model of `spec` (pipelines.models.ModelSpec), or a fresh one seeded with `seed`, in eval mode.

    threshold: the detection score threshold (default the config's detection.min_confidence).
    """

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if spec is not None:
        if _coco_ids(spec.categories) != sample.categories.coco_ids:
            raise ModelMismatchError(f"the model's categories (COCO ids {_coco_ids(spec.categories)}) differ from "
                                     f"the data's ({list(sample.categories.coco_ids)})")
        model = load_model(spec, device=device, min_confidence=threshold)
        return ModelRun(model, sample, f"model {spec.location}")
    config = sample.config
    if threshold is not None:
        config = replace(config, detection=replace(config.detection, min_confidence=threshold))
    torch.manual_seed(seed)
    model = build_model(config, num_classes=sample.categories.num_classes).to(device).eval()
    return ModelRun(model, sample, f"untrained model (fresh initialisation, seed {seed})")


def _coco_ids(categories: dict[str, Any]) -> tuple[int, ...]:
    return CategoryMap.from_dict(categories).coco_ids


def _proposals(run: ModelRun, post_nms_topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes [P, 4], scores [P]) of the proposal layer for the image, best first."""

    _, objectness, deltas = run.features
    boxes, scores = run.model.proposal_settings.propose(objectness, deltas, run.model.anchors, run.batch["windows"],
                                                        post_nms_topk=post_nms_topk)
    return boxes[0].cpu(), scores[0].cpu()


def _recall(boxes: torch.Tensor, gt: torch.Tensor, iou: float = 0.5) -> float:
    """Fraction of gt boxes overlapped at >= iou by some box."""
    if not len(gt):
        return float("nan")
    if not len(boxes):
        return 0.0
    return float((box_iou(gt, boxes).max(1).values >= iou).float().mean())


def proposals_picture(run: ModelRun, path: str | os.PathLike) -> dict[str, Any]:
    """The proposal layer's output at test time: top pre_nms_topk anchors decoded, clipped to the window,
    NMS, best post_nms_test kept. Counts before and after NMS, and the recall of the gt boxes at IoU 0.5."""
    model, sample = run.model, run.sample
    settings = model.proposal_settings
    num_anchors = len(model.anchors)
    candidates = (sum(min(settings.pre_nms_topk, n) for n in settings.level_sizes)
                  if settings.pre_nms_per_level else min(settings.pre_nms_topk, num_anchors))
    # every box surviving NMS (post_nms_topk = A), then the first post_nms_test: what the model keeps
    boxes, scores = _proposals(run, num_anchors)
    after_nms = len(boxes)
    boxes, scores = boxes[: settings.post_nms_test], scores[: settings.post_nms_test]
    gt = torch.as_tensor(sample.row["gt_boxes"])
    recall = _recall(boxes, gt)
    title = (f"proposals of the {run.label}\n{num_anchors:,} anchors -> top {candidates:,} by objectness (before "
             f"NMS) -> {after_nms:,} after clipping + NMS {settings.nms_threshold:g} -> {len(boxes):,} kept "
             f"(post_nms_test {settings.post_nms_test})\ngt recall at IoU 0.5: {recall:.2f}; image {sample.image_id} "
             f"from {sample.source}")
    pic = Picture(1, 2, panel=panel_px(sample.size), title=title)
    top = min(TOP_PROPOSALS, len(boxes))
    ax = pic.axes(0, 0, f"top {top} proposals with objectness; gt dashed white")
    draw_instances(ax, sample.canvas, boxes=boxes[:top].numpy(), labels=[f"#{k}" for k in range(top)],
                   scores=scores[:top].numpy(), fontsize=6, linewidth=1.0)
    draw_boxes(ax, gt, GT, linewidth=1.2, linestyle="--")
    ax = pic.axes(0, 1, f"all {len(boxes)} kept proposals; window dotted cyan")
    show_image(ax, sample.canvas)
    draw_boxes(ax, boxes, POSITIVE, linewidth=0.4, alpha=0.5)
    draw_boxes(ax, gt, GT, linewidth=1.2, linestyle="--")
    draw_boxes(ax, sample.row["window"], "cyan", linestyle=":", linewidth=0.8)
    return pic.save(path, {"anchors": num_anchors, "before_nms": candidates, "after_nms": after_nms,
                           "kept": len(boxes), "recall": recall})


def detection_targets_picture(run: ModelRun, path: str | os.PathLike, *, seed: int = 0,
                              mask_panels: int = 4) -> dict[str, Any]:
    """The RoIs sampled for the heads from training-time proposals (post_nms_train) plus the gt boxes: positives,
    negatives, the positives refined by their target deltas (they land on the gt), and mask targets."""

    model, sample, batch = run.model, run.sample, run.batch
    proposals, _ = _proposals(run, model.proposal_settings.post_nms_train)
    settings = model.target_settings
    targets = settings.sample(
        [proposals.to(run.device)], gt_class_ids=batch["gt_class_ids"], gt_boxes=batch["gt_boxes"],
        gt_mini_masks=batch["gt_mini_masks"], crowd_boxes=batch["crowd_boxes"],
        generator=torch.Generator(device=run.device).manual_seed(seed),
    )
    rois, positive = targets.rois.cpu(), targets.positive.cpu()
    pos_rois, neg_rois = rois[positive], rois[~positive]
    refined = decode(targets.deltas.cpu()[positive], pos_rois, std=settings.bbox_std)
    gt = torch.as_tensor(sample.row["gt_boxes"])
    gt_index = box_iou(refined, gt).argmax(1) if len(gt) and len(refined) else torch.zeros(0, dtype=torch.int64)
    error = float((refined - gt[gt_index]).abs().max()) if len(refined) else 0.0
    classes = targets.class_ids.cpu()[positive].tolist()
    title = (f"detection-targets of the {run.label}\n{len(proposals)} proposals (post_nms_train) + {len(gt)} gt "
             f"-> {len(rois)} RoIs sampled (rois_per_image {settings.rois_per_image}, at most "
             f"{settings.positive_fraction:.0%} positive, IoU >= {settings.positive_iou:g}): "
             f"{len(pos_rois)} positive, {len(neg_rois)} negative\nrefined positives vs gt: max error "
             f"{error:.4f} px; image {sample.image_id} from {sample.source}, seed {seed}")
    cols = 3
    rows = 1 + (min(mask_panels, len(pos_rois)) + cols - 1) // cols
    pic = Picture(rows, cols, panel=panel_px(sample.size), title=title)
    ax = pic.axes(0, 0, f"{len(pos_rois)} positive RoIs (green)\n{min(40, len(neg_rois))} of "
                        f"{len(neg_rois)} negatives (red), gt dashed white")
    show_image(ax, sample.canvas)
    draw_boxes(ax, neg_rois[subsample(len(neg_rois), 40, seed)], NEGATIVE, linewidth=0.5, alpha=0.8)
    draw_boxes(ax, pos_rois, POSITIVE, linewidth=0.8)
    draw_boxes(ax, gt, GT, linewidth=1.2, linestyle="--")
    ax = pic.axes(0, 1, "positives + their target deltas, coloured by gt\n(should sit on the dashed gt boxes)")
    show_image(ax, sample.canvas)
    draw_boxes(ax, refined, [rgb(int(g)) for g in gt_index], linewidth=0.9)
    draw_boxes(ax, gt, GT, linewidth=1.2, linestyle="--")
    counts = [f"{sample.categories.name(c)}: {classes.count(c)}" for c in sorted(set(classes))]
    text_panel(pic.axes(0, 2, "sample"), [f"RoIs      {len(rois)}", f"positive  {len(pos_rois)}",
                                          f"negative  {len(neg_rois)}", "", "positives per class:", *counts])
    masks = targets.masks.cpu().numpy()
    shown = subsample(len(pos_rois), mask_panels, seed)
    ious = box_iou(pos_rois, gt).max(1).values if len(gt) and len(pos_rois) else torch.zeros(len(pos_rois))
    for k, p in enumerate(shown):
        size = masks.shape[-1]
        ax = pic.axes(1 + k // cols, k % cols, f"mask target {size}x{size} of positive #{p}\n"
                                               f"{sample.categories.name(classes[p])}, RoI IoU with gt "
                                               f"{float(ious[p]):.2f}")
        show_image(ax, (masks[p] * 255).round().astype(np.uint8))
    return pic.save(path, {"rois": len(rois), "positive": len(pos_rois), "negative": len(neg_rois),
                           "proposals": len(proposals), "max_error_px": error})


def predictions_picture(run: ModelRun, path: str | os.PathLike) -> dict[str, Any]:
    """The model's final detections (masks pasted, class names, scores) next to the ground truth."""

    model, sample = run.model, run.sample
    with torch.no_grad():
        det = {k: v.cpu() for k, v in model.eval()(run.batch)[0].items()}
    size = sample.size
    masks = paste_masks_in_image(det["masks"].float(), det["boxes"].float(), size, size).numpy()
    names = [sample.categories.name(c) for c in det["class_ids"].tolist()]
    gt, gt_classes = torch.as_tensor(sample.row["gt_boxes"]), torch.as_tensor(sample.row["gt_class_ids"])
    found = 0
    if len(gt) and len(det["boxes"]):
        same = gt_classes[:, None] == det["class_ids"][None, :]  # [G, D]
        found = int(((box_iou(gt, det["boxes"].float()) >= 0.5) & same).any(1).sum())
    threshold = model.detection_settings.min_confidence
    title = (f"predictions of the {run.label}\n{len(names)} detections with score >= {threshold:g} (at most "
             f"{model.detection_settings.max_detections}); {found} of {len(gt)} gt found (same class, "
             f"IoU >= 0.5)\nimage {sample.image_id} from {sample.source}")
    pic = Picture(1, 2, panel=panel_px(size), title=title)
    ax = pic.axes(0, 0, f"ground truth: {len(gt)} instances")
    draw_instances(ax, sample.canvas, boxes=sample.row["gt_boxes"], masks=sample.gt_masks, labels=sample.labels)
    ax = pic.axes(0, 1, f"predictions: {len(names)} detections")
    draw_instances(ax, sample.canvas, boxes=det["boxes"].numpy(), masks=masks, labels=names,
                   scores=det["scores"].numpy())
    return pic.save(path, {"detections": len(names), "gt": len(gt), "found": found,
                           "scores": [round(float(s), 4) for s in det["scores"]]})


def batch_picture(shards: ShardSet, split: str, path: str | os.PathLike, *, index: int = 0, step: int = 0,
                  config: Config | None = None) -> dict[str, Any]:
    """`train.batch_size` consecutive rows from `index`, decoded by the loader's ShardBatchDecoder and flipped as
    the trainer flips step `step` (StepRunner.flip_choice with train.seed, rank 0, then flip_batch)."""

    config = config or Config.from_dict(shards.manifest["config"])
    rows = shards.read_rows(split, start=index, count=config.train.batch_size)
    categories = CategoryMap.from_dict(shards.categories)
    decoder = ShardBatchDecoder(**decoder_for(config, len(anchors_from_config(config))))
    decoded = decoder({k: [r[k] for r in rows] for k in rows[0]})
    batch = densify_rpn_deltas({k: torch.as_tensor(v) for k, v in decoded.items()})
    n = len(rows)
    runner = StepRunner(model=None, optimizer=None, scheduler=None, device=torch.device("cpu"), grad_clip=0.0,
                        seed=config.train.seed)
    which = runner.flip_choice(step, n) if config.train.flip else torch.zeros(n, dtype=torch.bool)
    try:
        flip_perm = flip_permutation_from_config(config)
    except ValueError:  # anchors not mirror-symmetric: the trainer cannot flip either
        flip_perm, which = None, torch.zeros(n, dtype=torch.bool)
    if flip_perm is not None:
        batch = flip_batch(batch, flip_perm=flip_perm, which=which)
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    size = config.image.max_dim
    title = (f"batch: {n} images of {shards.uri} [{split}] rows {index}..{index + n - 1} as the trainer receives them\n"
             f"flipped at train step {step} (seed {config.train.seed}): {which.int().tolist()}\n"
             f"images {list(shapes['images'])} uint8, gt_boxes {list(shapes['gt_boxes'])}, "
             f"gt_mini_masks {list(shapes['gt_mini_masks'])}, rpn_match {list(shapes['rpn_match'])}")
    cols = min(n, 4)
    pic = Picture(math.ceil(n / cols), cols, panel=panel_px(size), title=title)
    for i in range(n):
        real = batch["gt_class_ids"][i] > 0
        boxes = batch["gt_boxes"][i][real].numpy()
        masks = expanded_masks(batch["gt_mini_masks"][i][real].numpy().astype(bool), boxes, size)
        match = batch["rpn_match"][i]
        ax = pic.axes(i // cols, i % cols,
                      f"image {int(batch['image_ids'][i])}{' FLIPPED' if which[i] else ''}: {len(boxes)} gt\n"
                      f"rpn: {int((match == 1).sum())} pos, {int((match == -1).sum())} ignored; window "
                      f"{tuple(batch['windows'][i].tolist())}")
        image = batch["images"][i].permute(1, 2, 0).numpy()  # (3, S, S) -> (S, S, 3)
        draw_instances(ax, np.ascontiguousarray(image), boxes=boxes, masks=masks,
                       labels=[categories.name(c) for c in batch["gt_class_ids"][i][real].tolist()])
        draw_boxes(ax, batch["windows"][i].numpy(), "cyan", linestyle=":", linewidth=0.8)
    return pic.save(path, {"image_ids": batch["image_ids"].tolist(), "flipped": which.tolist(), "shapes": shapes})

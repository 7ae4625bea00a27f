"""The inspect stages that need no model: gt, anchors, rpn-targets, mini-masks, deltas (one PNG each).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from mrcnn.anchors import AnchorSettings, anchors_from_config, anchors_per_level
from mrcnn.box_coder import decode
from mrcnn.config import Config
from mrcnn.geometry import coco_bbox_to_box
from mrcnn.mini_masks import expand_masks, mini_mask_boxes
from mrcnn.rpn_targets import sample_anchors
from pipelines.data.coco import annotation_mask
from pipelines.inspection.panels import (
    DRAWN_SAMPLE,
    GT,
    IGNORED,
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
from pipelines.inspection.samples import Sample, describe
from pipelines.pictures import draw_instances, overlay_color


def gt_picture(sample: Sample, path: str | os.PathLike) -> dict[str, Any]:
    """The stored image with its gt masks (mini-masks expanded), boxes, class names and crowd regions."""
    r = sample.row
    g, c = len(r["gt_class_ids"]), len(r["crowd_boxes"])
    title = (f"gt: {g} instances, {c} crowd regions\n{describe(sample)}\n"
             f"input {sample.size}x{sample.size} (image top-left, zero padding); dashed: window, crowd regions")
    pic = Picture(1, 2, panel=panel_px(sample.size), title=title)
    ax = pic.axes(0, 0, "image as stored, gt masks, boxes and classes")
    draw_instances(ax, sample.canvas, boxes=r["gt_boxes"], masks=sample.gt_masks, labels=sample.labels)
    draw_boxes(ax, r["crowd_boxes"], GT, linestyle="--")
    draw_boxes(ax, r["window"], "cyan", linestyle=":", linewidth=0.8)
    lines = [f"{'#':>2} {'class':<12} {'x1':>6} {'y1':>6} {'x2':>6} {'y2':>6} {'mask px':>7}"]
    for i, (name, box) in enumerate(zip(sample.labels, r["gt_boxes"], strict=True)):
        lines.append(f"{i:>2} {name[:12]:<12} " + " ".join(f"{v:6.1f}" for v in box)
                     + f" {int(sample.gt_masks[i].sum()):>7}")
    lines += [f"crowd {j}: " + " ".join(f"{v:.1f}" for v in box) for j, box in enumerate(r["crowd_boxes"])]
    text_panel(pic.axes(0, 1, "instances (padded-image pixels)"), lines[:40])
    return pic.save(path, {"instances": g, "crowd": c, "image_id": sample.image_id, "image_rect": pic.rect(0, 0)})


def anchors_picture(config: Config, path: str | os.PathLike, sample: Sample | None = None) -> dict[str, Any]:
    """Anchors of every ratio at three positions of each level (centre, and a quarter in from two corners),
    every anchor centre of the coarser levels as a dot, and the counts; on the sample's image when given."""

    anchors = anchors_from_config(config).numpy()  # with the config's centre offset and rounding
    per_level = anchors_per_level(AnchorSettings.from_config(config))
    total, size, ratios = len(anchors), config.image.max_dim, config.rpn.anchor_ratios
    title = (f"anchors: {total:,} in total, per level {', '.join(f'{n:,}' for n in per_level)}\n"
             f"'{config.name}' config, {size}x{size} input, anchor stride {config.rpn.anchor_stride}, "
             f"ratios (w/h) {', '.join(f'{r:g}' for r in ratios)}")
    levels = len(per_level)
    cols = 3
    rows = math.ceil((levels + 1) / cols)
    pic = Picture(rows, cols, panel=panel_px(size), title=title)
    canvas = sample.canvas // 2 if sample is not None else np.full((size, size, 3), 40, np.uint8)
    ratio_colors = [rgb(k) for k in range(len(ratios))]
    offset = 0
    lines = ["level stride scale  positions  anchors"]
    for level, (count, stride, scale) in enumerate(zip(per_level, config.rpn.feature_strides,
                                                       config.rpn.anchor_scales, strict=True)):
        n = math.isqrt(count // len(ratios))
        ax = pic.axes(level // cols, level % cols,
                      f"P{level + 2}: stride {stride}, scale {scale}\n{n}x{n} positions x {len(ratios)} ratios = "
                      f"{count:,}")
        show_image(ax, canvas)
        block = anchors[offset : offset + count].reshape(n, n, len(ratios), 4)  # [row, column, ratio, 4]
        if n <= 64:  # every centre of the level as a dot; finer levels would be a grey sheet
            centres = (block[:, :, 0, :2] + block[:, :, 0, 2:]).reshape(-1, 2) / 2
            ax.scatter(centres[:, 0], centres[:, 1], s=1.5, c="white", linewidths=0)
        for i, j in sorted({(n // 2, n // 2), (n // 4, n // 4), (n - 1 - n // 4, n - 1 - n // 4)}):
            draw_boxes(ax, block[i, j], ratio_colors, linewidth=1.2)
        lines.append(f"P{level + 2:<4} {stride:>6} {scale:>5}  {n:>4} x {n:<4} {count:>8,}")
        offset += count
    lines += [f"{'total':<27}{total:>9,}", "", "colours by ratio (w/h):"]
    lines += [f"  {r:g}: #" + "".join(f"{c:02x}" for c in overlay_color(k)) for k, r in enumerate(ratios)]
    text_panel(pic.axes(levels // cols, levels % cols, "counts"), lines)
    return pic.save(path, {"total": total, "per_level": per_level})


def rpn_targets_picture(sample: Sample, path: str | os.PathLike, *, seed: int = 0) -> dict[str, Any]:
    """Anchor labels from the stored RPN targets, then the per-step balanced sample (`sample_anchors`)."""

    rpn = sample.config.rpn
    match = torch.as_tensor(sample.row["rpn_match"])  # [A] int8, 1 / 0 / -1
    anchors = sample.anchors.numpy()
    pos, neg, ign = (np.flatnonzero(match.numpy() == v) for v in (1, 0, -1))
    pos_mask, neg_mask = sample_anchors(match[None], num_samples=rpn.anchors_per_image,
                                        positive_fraction=rpn.positive_fraction,
                                        generator=torch.Generator().manual_seed(seed))
    s_pos, s_neg = np.flatnonzero(pos_mask[0].numpy()), np.flatnonzero(neg_mask[0].numpy())
    title = (f"rpn-targets: {len(anchors):,} anchors -> {len(pos)} positive, {len(neg):,} negative, {len(ign):,} "
             f"ignored (IoU >= {rpn.positive_iou:g} / < {rpn.negative_iou:g})\n"
             f"sampled {rpn.anchors_per_image} (at most {rpn.positive_fraction:.0%} positive, seed {seed}): "
             f"{len(s_pos)} positive + {len(s_neg)} negative\n{describe(sample)}")
    pic = Picture(1, 2, panel=panel_px(sample.size), title=title)
    gt = sample.row["gt_boxes"]
    ax = pic.axes(0, 0, f"before sampling: all {len(pos)} positives (green), gt (white)\n"
                        f"{min(DRAWN_SAMPLE, len(neg))} of the negatives (red), "
                        f"{min(DRAWN_SAMPLE, len(ign))} of the ignored (yellow)")
    show_image(ax, sample.canvas)
    draw_boxes(ax, anchors[neg[subsample(len(neg), DRAWN_SAMPLE, seed)]], NEGATIVE, linewidth=0.6, alpha=0.8)
    draw_boxes(ax, anchors[ign[subsample(len(ign), DRAWN_SAMPLE, seed)]], IGNORED, linewidth=0.6, linestyle="--")
    draw_boxes(ax, anchors[pos], POSITIVE, linewidth=0.8)
    draw_boxes(ax, gt, GT, linewidth=1.6)
    ax = pic.axes(0, 1, f"after sampling: {len(s_pos)} positives (green), {len(s_neg)} negatives (red)")
    show_image(ax, sample.canvas)
    draw_boxes(ax, anchors[s_neg], NEGATIVE, linewidth=0.4, alpha=0.6)
    draw_boxes(ax, anchors[s_pos], POSITIVE, linewidth=0.8)
    draw_boxes(ax, gt, GT, linewidth=1.6)
    return pic.save(path, {"positive": len(pos), "negative": len(neg), "ignored": len(ign),
                           "sampled_positive": len(s_pos), "sampled_negative": len(s_neg)})


def mini_masks_picture(sample: Sample, path: str | os.PathLike, *, max_instances: int = 6) -> dict[str, Any]:
    """Per instance: its original-resolution mask (from the COCO record), the stored mini-mask, and the
    mini-mask expanded back to original pixels over (mini box / scale); IoU of original and expanded."""

    r = sample.row
    height, width, scale = r["height"], r["width"], r["scale"]
    record = sample.coco_record()
    anns = [a for a in record["annotations"] if not a["iscrowd"]]
    ann_boxes = coco_bbox_to_box(torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4), scale)
    g = len(r["gt_class_ids"])
    shown = min(g, max_instances)
    orig_boxes = (mini_mask_boxes(torch.as_tensor(r["gt_boxes"])) / scale).reshape(-1, 4)  # original pixels
    ious, panels = [], []
    for i in range(g):
        # the row keeps a subset of the annotations in order; its gt box is the annotation's bbox * scale
        err = (ann_boxes - torch.as_tensor(r["gt_boxes"][i])).abs().amax(1) if len(anns) else torch.zeros(0)
        if not len(err) or float(err.min()) > 0.01:
            ious.append(float("nan"))
            continue
        original = annotation_mask(anns[int(err.argmin())], height, width).astype(bool)
        expanded = expand_masks(torch.as_tensor(r["mini_masks"][i : i + 1]), orig_boxes[i : i + 1], height,
                                width)[0].numpy()
        ious.append(float((original & expanded).sum() / max((original | expanded).sum(), 1)))
        if i < shown:
            panels.append((i, original, expanded))
    valid = [v for v in ious if not math.isnan(v)]
    summary = f"mean {np.mean(valid):.3f}, min {np.min(valid):.3f}" if valid else "no instances"
    m = sample.config.mask.mini_mask_size
    title = (f"mini-masks: {g} instances, {m}x{m} mini-masks; IoU(original, expanded back): {summary}\n"
             f"{describe(sample)}\nshowing {shown} of {g}; expanded: white both, red original only, "
             f"blue expanded only")
    pic = Picture(max(shown, 1), 3, panel=panel_px(sample.size), title=title)
    image = sample.original_image()
    for row_i, (i, original, expanded) in enumerate(panels):
        x1, y1, x2, y2 = orig_boxes[i].tolist()
        pad = 0.15 * max(x2 - x1, y2 - y1, 4)
        cx1, cy1 = max(int(x1 - pad), 0), max(int(y1 - pad), 0)
        cx2, cy2 = min(math.ceil(x2 + pad), width), min(math.ceil(y2 + pad), height)
        crop = np.zeros((cy2 - cy1, cx2 - cx1, 3), np.uint8) if image is None else image[cy1:cy2, cx1:cx2]
        name = sample.labels[i]
        ax = pic.axes(row_i, 0, f"#{i} {name}: original mask ({int(original.sum())} px)\n"
                                f"{width}x{height} original pixels, crop around the mini box / scale")
        crop_box = [[x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1]]
        draw_instances(ax, np.full_like(crop, 60) if image is None else crop, boxes=crop_box,
                       masks=original[None, cy1:cy2, cx1:cx2], labels=[name], colors=[overlay_color(i)])
        ax = pic.axes(row_i, 1, f"#{i} mini-mask {m}x{m} ({int(r['mini_masks'][i].sum())} cells set)")
        show_image(ax, r["mini_masks"][i].astype(np.uint8) * 255)
        diff = np.zeros((cy2 - cy1, cx2 - cx1, 3), np.uint8)
        o, e = original[cy1:cy2, cx1:cx2], expanded[cy1:cy2, cx1:cx2]
        diff[o & e] = 255
        diff[o & ~e] = (255, 40, 40)
        diff[~o & e] = (60, 120, 255)
        ax = pic.axes(row_i, 2, f"#{i} expanded back: IoU {ious[i]:.3f}\n({int(e.sum())} px)")
        show_image(ax, diff)
    if not panels:
        text_panel(pic.axes(0, 0), ["no instances in this image"])
    return pic.save(path, {"instances": g, "ious": ious, "mean_iou": float(np.mean(valid)) if valid else None})


def deltas_picture(sample: Sample, path: str | os.PathLike) -> dict[str, Any]:
    """Positive anchors, and the boxes their stored deltas decode to, coloured by the gt box each is matched to
    (highest IoU): the decoded boxes must land on the gt boxes."""


    r = sample.row
    pos = torch.as_tensor(r["rpn_pos_idx"])
    anchors = sample.anchors[pos]  # [P, 4]
    decoded = decode(torch.as_tensor(r["rpn_pos_deltas"]), anchors, std=sample.config.rpn.bbox_std)
    gt = torch.as_tensor(r["gt_boxes"])
    if len(pos) and len(gt):
        match = box_iou(anchors, gt).argmax(1)  # the gt box each positive's deltas were encoded against
        error = float((decoded - gt[match]).abs().max())
        min_iou = float(box_iou(decoded, gt).max(1).values.min())
    else:
        match, error, min_iou = torch.zeros(len(pos), dtype=torch.int64), 0.0, float("nan")
    colors = [rgb(int(g)) for g in match]
    title = (f"deltas: {len(pos)} positive anchors, their stored deltas (std {tuple(sample.config.rpn.bbox_std)}) "
             f"decoded\nmax |decoded - gt| = {error:.4f} px, min IoU(decoded, gt) = {min_iou:.4f}\n"
             f"{describe(sample)}")
    pic = Picture(1, 2, panel=panel_px(sample.size), title=title)
    for col, (boxes, caption) in enumerate(((anchors, "positive anchors, coloured by their gt box"),
                                            (decoded, "anchors + stored deltas: should sit on the gt"))):
        ax = pic.axes(0, col, f"{caption}\ngt boxes dashed white")
        show_image(ax, sample.canvas)
        draw_boxes(ax, boxes, colors, linewidth=0.9)
        draw_boxes(ax, gt, GT, linewidth=1.2, linestyle="--")
    return pic.save(path, {"positives": len(pos), "max_error_px": error, "min_iou": min_iou})

"""COCO evaluation for the `evaluate` stage: `pipelines.data.coco_metrics` (COCOeval with pycocotools or
faster-coco-eval, in the data layer so that training's quick evaluation uses it too) and its precision-recall
figure.

    result = evaluate_detections("annotations/instances_val2017.json", detections, image_ids=predicted_ids)
    pr_curve_figure(result, "bbox", "out/pr_bbox.png")
"""

from __future__ import annotations

import os

from pipelines.data.coco_metrics import CocoEvalResult, pr_curves
from pipelines.pictures import save_figure


def pr_curve_figure(
    result: CocoEvalResult,
    iou_type: str,
    path: str | os.PathLike,
    *,
    figsize: tuple[float, float] = (6.0, 5.0),
    dpi: int = 100,
) -> str:
    """PNG of precision vs recall at IoU 0.50, 0.75 and the 0.50:0.95 mean (area all, maxDets 100), the
    legend giving each curve's AP; figsize * dpi pixels. Returns the path."""
    if iou_type not in result.precision:
        raise KeyError(f"no {iou_type!r} evaluation in this result (have {list(result.precision)})")
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    for (label, (recall, curve, ap)), style in zip(pr_curves(result, iou_type).items(), ("-", "--", "-."), strict=True):
        ax.plot(recall, curve, style, linewidth=1.8, label=f"{label}  AP {ap:.3f}" if ap >= 0 else f"{label}  AP n/a")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{iou_type} precision-recall ({result.num_images} images, area all, maxDets 100)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    # fixed margins in inches rather than tight_layout (which measures every tick label: slow)
    fig.subplots_adjust(
        left=0.7 / figsize[0], right=1 - 0.2 / figsize[0], bottom=0.55 / figsize[1], top=1 - 0.4 / figsize[1]
    )
    return save_figure(fig, path)

"""Pictures for people: predictions drawn on images; PNG files for MLflow artifacts.

Everything draws on `matplotlib.figure.Figure` objects rendered by the Agg canvas, never through `pyplot`:
no display is needed, no global figure state is kept (so nothing leaks between Ray tasks or threads), and
figure size and dpi are fixed, so a PNG's pixel size is known in advance:
`width_px = figsize[0] * dpi`, `height_px = figsize[1] * dpi`.

Image frame: pixel (row i, column j) covers [j, j + 1) x [i, i + 1), the project's convention, so boxes
`(x1, y1, x2, y2)` in the image's pixels are drawn where they belong (`imshow(..., extent=(0, W, H, 0))`).

    fig = Figure(figsize=(W / 100, H / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])          # one image pixel = one PNG pixel
    draw_instances(ax, image, boxes=boxes, masks=masks, labels=["cat", "dog"], scores=[0.93, 0.81])
    save_figure(fig, "out.png")
"""

from __future__ import annotations

import colorsys
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pipelines.infra.storage import write_bytes

__all__ = [
    "draw_instances",
    "overlay_color",
    "predictions_grid",
    "save_figure",
    "write_bytes",
]


_GOLDEN = 0.618033988749895


def overlay_color(i: int) -> tuple[int, int, int]:
    """Colour of instance `i` as (r, g, b) in 0..255; the same `i` always gives the same colour.

    Hues step by the golden ratio, so any run of consecutive indices is spread around the colour wheel
    (neighbours never look alike) without a palette that runs out; saturation and value alternate a
    little so that hues that come back close are still told apart.
    """
    hue = (i * _GOLDEN) % 1.0
    sat = 0.85 if i % 2 == 0 else 0.65
    val = 0.95 if (i // 2) % 2 == 0 else 0.80
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return round(r * 255), round(g * 255), round(b * 255)


def save_figure(fig: Figure, path: str | os.PathLike) -> str:
    """Render `fig` as PNG at its own size and dpi (no tight bbox: the pixel size stays figsize * dpi)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return write_bytes(path, buf.getvalue())


def _blend_masks(image: np.ndarray, masks: np.ndarray, colors: Sequence[tuple[int, int, int]], alpha: float):
    """image [H, W, 3] uint8, masks [N, H, W] bool -> [H, W, 3] uint8 with each mask tinted by its colour.

    Blended in numpy rather than as stacked RGBA layers: later instances are painted over earlier ones,
    and the result is one image, so every pixel's colour is exact (what the pixel test relies on).
    """
    out = image.astype(np.float32)
    for mask, color in zip(masks, colors, strict=True):
        if not mask.any():
            continue
        out[mask] = out[mask] * (1.0 - alpha) + np.asarray(color, np.float32) * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def draw_instances(
    ax: Any,
    image: np.ndarray,
    *,
    boxes: np.ndarray | Sequence[Sequence[float]],
    masks: np.ndarray | None = None,
    labels: Sequence[str],
    scores: np.ndarray | Sequence[float] | None = None,
    colors: Sequence[tuple[int, int, int]] | None = None,
    alpha: float = 0.45,
    linewidth: float = 1.5,
    fontsize: float = 8.0,
) -> Any:
    """Draw instances on a matplotlib axes: tinted masks, box outlines and "label 0.93" tags.

    image: [H, W, 3] uint8 RGB (a [H, W] grayscale image is shown as RGB).
    boxes: [N, 4] (x1, y1, x2, y2) in the image's pixels (pixel j covers [j, j + 1)).
    masks: [N, H, W] bool (or 0/1) at the image's size, or None for boxes only.
    labels: N strings; scores: [N] in [0, 1] or None (then the tag is the label alone).
    colors: N (r, g, b) 0..255, default `overlay_color(i)` for instance i.
    The axes' limits are set to the image and its frame turned off. Returns `ax`.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    if len(labels) != n:
        raise ValueError(f"{n} boxes but {len(labels)} labels")
    if scores is not None and len(scores) != n:
        raise ValueError(f"{n} boxes but {len(scores)} scores")
    if colors is None:
        colors = [overlay_color(i) for i in range(n)]
    elif len(colors) != n:
        raise ValueError(f"{n} boxes but {len(colors)} colors")

    shown = image
    if masks is not None:
        masks = np.asarray(masks).astype(bool, copy=False)
        if masks.shape != (n, height, width):
            raise ValueError(f"masks must be [N, H, W] = {(n, height, width)}, got {masks.shape}")
        shown = _blend_masks(image, masks, colors, alpha)

    # extent puts pixel edges on integer coordinates (pixel j covers [j, j + 1)), the frame boxes use;
    # "nearest" keeps pixels exact when the image is shown at its own size.
    ax.imshow(shown, extent=(0, width, height, 0), interpolation="nearest")
    for i in range(n):
        x1, y1, x2, y2 = boxes[i]
        rgb = tuple(c / 255.0 for c in colors[i])
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=rgb, linewidth=linewidth))
        tag = labels[i] if scores is None else f"{labels[i]} {float(scores[i]):.2f}"
        # the tag sits on top of the box; inside it when the box touches the image's top edge
        above = y1 >= fontsize * 1.6
        ax.text(
            x1,
            y1 if above else y1 + 1,
            tag,
            fontsize=fontsize,
            color="white",
            va="bottom" if above else "top",
            ha="left",
            clip_on=True,
            bbox={"facecolor": rgb, "alpha": 0.75, "pad": 1.0, "edgecolor": "none"},
        )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    return ax


def predictions_grid(
    items: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    cols: int = 4,
    panel_inches: float = 4.0,
    dpi: int = 100,
) -> str:
    """A grid of images with their predictions drawn, saved as PNG; returns the path.

    items: dicts with `image` [H, W, 3] uint8, `boxes` [N, 4] (x1, y1, x2, y2) in that image's pixels,
    `labels` (N strings), and optionally `masks` [N, H, W] bool, `scores` [N], `title` (str).
    The grid has min(cols, len(items)) columns and ceil(len(items) / cols) rows of square panels of
    `panel_inches`, so the PNG is (columns * panel_inches * dpi) x (rows * panel_inches * dpi) pixels.
    """
    if not items:
        raise ValueError("predictions_grid needs at least one item")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    ncols = min(cols, len(items))
    nrows = math.ceil(len(items) / ncols)
    fig = Figure(figsize=(ncols * panel_inches, nrows * panel_inches), dpi=dpi)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    # a little room above each panel for its title, none wasted at the edges
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95 if nrows == 1 else 0.97, wspace=0.04, hspace=0.1)
    for index, ax in enumerate(axes.ravel()):
        if index >= len(items):
            ax.axis("off")
            continue
        item = items[index]
        draw_instances(
            ax,
            item["image"],
            boxes=item.get("boxes", np.zeros((0, 4))),
            masks=item.get("masks"),
            labels=item.get("labels", []),
            scores=item.get("scores"),
            colors=item.get("colors"),
        )
        if item.get("title"):
            ax.set_title(str(item["title"]), fontsize=9)
    return save_figure(fig, path)

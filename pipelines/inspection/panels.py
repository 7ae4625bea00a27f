"""The layout every `mrcnn-cli inspect` picture shares: a title band with the numbers, a grid of captioned panels.

A title band of TITLE_PX holding the numbers, then a grid of square panels, each with a caption band of
CAPTION_PX above it. A panel is `panel_px(S)` pixels for an S x S input: an integer multiple of S up to
PANEL_PX (one image pixel = an exact block of PNG pixels), PANEL_PX for larger inputs. So a picture of R x C
panels is `picture_size(R, C, panel_px(S))` = (C * panel, TITLE_PX + R * (CAPTION_PX + panel)) PNG pixels.
Boxes are (x1, y1, x2, y2) in padded-image pixels unless stated.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pipelines.pictures import overlay_color, save_figure

PANEL_PX = 400


TITLE_PX = 88  # five lines of 9 pt text


CAPTION_PX = 32


DPI = 100


DRAWN_SAMPLE = 40  # negatives / ignored anchors drawn: enough to see where they are, few enough to see the image


POSITIVE, NEGATIVE, IGNORED, GT = "#22dd22", "#ff3333", "#ffcc00", "white"


def panel_px(image_size: int) -> int:
    """Side of a square panel for an image_size x image_size input (see the module docstring)."""
    return image_size * (PANEL_PX // image_size) if image_size <= PANEL_PX else PANEL_PX


def picture_size(rows: int, cols: int, panel: int) -> tuple[int, int]:
    """(width, height) in PNG pixels of a picture of rows x cols panels of `panel` px."""
    return cols * panel, TITLE_PX + rows * (CAPTION_PX + panel)


class Picture:
    """A Figure of rows x cols square panels under a title band, rendered by Agg at a known pixel size."""

    def __init__(self, rows: int, cols: int, *, panel: int, title: str):
        self.rows, self.cols, self.panel, self.title = rows, cols, panel, title
        self.width, self.height = picture_size(rows, cols, panel)
        self.fig = Figure(figsize=(self.width / DPI, self.height / DPI), dpi=DPI)
        # wrapped to the width (a 9 pt DejaVu Sans Mono character is 8 px at 100 dpi), at most five lines
        chars = max(int((self.width - 12) / 8), 40)
        lines = [part for line in title.splitlines() for part in textwrap.wrap(line, chars) or [""]]
        self.fig.text(6 / self.width, 1 - 6 / self.height, "\n".join(lines[:5]), ha="left", va="top", fontsize=9,
                      family="monospace")

    def rect(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, width, height) of panel (row, col) in PNG pixels, top-left origin."""
        return col * self.panel, TITLE_PX + row * (CAPTION_PX + self.panel) + CAPTION_PX, self.panel, self.panel

    def axes(self, row: int, col: int, caption: str = "") -> Any:
        left, top, w, h = self.rect(row, col)
        ax = self.fig.add_axes((left / self.width, 1 - (top + h) / self.height, w / self.width, h / self.height))
        ax.set_title(caption, fontsize=7.5, pad=3)
        ax.axis("off")
        return ax

    def save(self, path: str | os.PathLike, numbers: dict[str, Any]) -> dict[str, Any]:
        """Write the PNG; returns `numbers` plus path, title and size (width, height)."""
        return {**numbers, "path": save_figure(self.fig, path), "title": self.title,
                "size": (self.width, self.height)}


def show_image(ax: Any, image: np.ndarray) -> None:
    """image [H, W, 3] uint8 (or [H, W] gray, 0..255) drawn so that pixel j covers [j, j + 1), limits to the image."""
    height, width = image.shape[:2]
    gray = {"cmap": "gray", "vmin": 0, "vmax": 255} if image.ndim == 2 else {}  # fixed scale: an all-ones mask is white
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest", **gray)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)


def draw_boxes(ax: Any, boxes: Any, color: Any, *, linewidth: float = 1.0, alpha: float = 1.0,
               linestyle: str = "-") -> None:
    """Outlines of boxes [N, 4] (x1, y1, x2, y2); color: one colour or N colours."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        return
    rects = [Rectangle((x1, y1), x2 - x1, y2 - y1) for x1, y1, x2, y2 in boxes]
    ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor=color, linewidths=linewidth, alpha=alpha,
                                      linestyle=linestyle))


def text_panel(ax: Any, lines: list[str]) -> None:
    ax.text(0.02, 0.98, "\n".join(lines), transform=ax.transAxes, ha="left", va="top", fontsize=7.5,
            family="monospace")


def rgb(i: int) -> tuple[float, float, float]:
    return tuple(c / 255.0 for c in overlay_color(i))


def subsample(n: int, k: int, seed: int) -> np.ndarray:
    """k of range(n) at random (seeded), sorted; all of them when n <= k."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))

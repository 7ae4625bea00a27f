"""`mrcnn-cli inspect STAGE`: every sub-net's work as a picture, one PNG per stage, numbers printed on it.

Stages (`STAGES`), each a plain function `*_picture(..., path) -> dict` of the numbers it printed:

    gt                 the image as stored (resized, padded) with its gt masks, boxes and class names
    anchors            anchors at a few positions of every level; total and per-level counts
    rpn-targets        positive / negative / ignored anchors against the gt boxes, before and after sampling
    mini-masks         per instance: original mask, mini-mask, mini-mask expanded back, and their IoU
    deltas             positive anchors, and the boxes their stored deltas decode to (they land on the gt)
    proposals, detection-targets, predictions, batch     the model's and the trainer's stages, in
                       pipelines/inspect_model.py (batch: a training batch exactly as the trainer receives it)

The image comes from the shards (`--shards --split`, the row the trainer reads) or straight from a COCO split
(`--dataset --split`), whose record goes through `pipelines.preprocess.RowMaker`, the code that writes the
shards; `batch` needs the shards. `run_inspect` dispatches, writes `all` into a folder and logs to MLflow.

Layout: a title band of TITLE_PX holding the numbers, then a grid of square panels, each with a caption band
of CAPTION_PX above it. A panel is `panel_px(S)` pixels for an S x S input: an integer multiple of S up to
PANEL_PX (one image pixel = an exact block of PNG pixels), PANEL_PX for larger inputs. So a picture of R x C
panels is `picture_size(R, C, panel_px(S))` = (C * panel, TITLE_PX + R * (CAPTION_PX + panel)) PNG pixels.
Boxes are (x1, y1, x2, y2) in padded-image pixels unless stated.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mrcnn.config import Config
from pipelines.coco_source import CategoryMap
from pipelines.visualize import draw_instances, overlay_color, save_figure

STAGES = ("gt", "anchors", "rpn-targets", "mini-masks", "deltas", "proposals", "detection-targets", "batch",
          "predictions")
MODEL_STAGES = ("proposals", "detection-targets", "predictions")

PANEL_PX = 400
TITLE_PX = 88  # five lines of 9 pt text
CAPTION_PX = 32
DPI = 100
DRAWN_SAMPLE = 40  # negatives / ignored anchors drawn: enough to see where they are, few enough to see the image
POSITIVE, NEGATIVE, IGNORED, GT = "#22dd22", "#ff3333", "#ffcc00", "white"


# ---------------------------------------------------------------------------------------------- layout
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


# ---------------------------------------------------------------------------------------------- the image
@dataclass
class Sample:
    """One image and its targets, exactly as a shard row holds them.

    raw: the row (SHARD_SCHEMA columns) as read from the shards or made by RowMaker; row: `decode_row(raw)` with
    dense rpn_match / rpn_deltas; annotations / images_root: where the original COCO record lives.
    """

    config: Config
    categories: CategoryMap
    raw: dict[str, Any]
    source: str
    annotations: str | None = None
    images_root: str | None = None
    record: dict[str, Any] | None = field(default=None, repr=False)

    @cached_property
    def anchors(self) -> torch.Tensor:
        from mrcnn.anchors import anchors_from_config

        return anchors_from_config(self.config)  # [A, 4]

    @cached_property
    def row(self) -> dict[str, Any]:
        from pipelines.shards import decode_row

        return decode_row(self.raw, num_anchors=len(self.anchors), mini_mask_size=self.config.mask.mini_mask_size)

    @property
    def size(self) -> int:
        return self.config.image.max_dim

    @property
    def image_id(self) -> int:
        return int(self.row["image_id"])

    @cached_property
    def canvas(self) -> np.ndarray:
        """[S, S, 3] uint8: the stored image at the top-left of the zero canvas, as the model sees it."""
        image = self.row["image"]
        out = np.zeros((self.size, self.size, 3), np.uint8)
        out[: image.shape[0], : image.shape[1]] = image
        return out

    @cached_property
    def gt_masks(self) -> np.ndarray:
        """[G, S, S] bool: the mini-masks expanded into their mini boxes."""
        return expanded_masks(self.row["mini_masks"], self.row["gt_boxes"], self.size)

    @property
    def labels(self) -> list[str]:
        return [self.categories.name(c) for c in self.row["gt_class_ids"]]

    def batch(self) -> dict[str, torch.Tensor]:
        """A one-image Batch (CONTRACT.md) from this row, through the loader's own decoder."""
        from pipelines.loader import ShardBatchDecoder, decoder_for

        decoder = ShardBatchDecoder(**decoder_for(self.config, len(self.anchors)))
        return {k: torch.as_tensor(v) for k, v in decoder({k: [v] for k, v in self.raw.items()}).items()}

    def coco_record(self) -> dict[str, Any]:
        """The image's record in the original COCO split (original-resolution annotations)."""
        if self.record is None:
            from pipelines.coco_source import read_split

            if not self.annotations:
                raise ValueError(f"{self.source}: no annotations file recorded, cannot read the original masks")
            source = read_split(self.annotations, self.images_root or "")
            found = [r for r in source.records if r["image_id"] == self.image_id]
            if not found:
                raise ValueError(f"image {self.image_id} is not in {self.annotations}")
            self.record = found[0]
        return self.record

    def original_image(self) -> np.ndarray | None:
        """[H, W, 3] uint8 original image of the COCO record, or None when it cannot be read."""
        from pipelines.coco_source import DatasetError, load_image_rgb

        try:
            return load_image_rgb(self.coco_record()["path"])
        except DatasetError:
            return None


def expanded_masks(mini: np.ndarray, gt_boxes: np.ndarray, size: int) -> np.ndarray:
    """mini [G, m, m] bool, gt_boxes [G, 4] -> [G, size, size] bool, each pasted into its mini box."""
    from mrcnn.mini_masks import expand_masks, mini_mask_boxes

    if not len(gt_boxes):
        return np.zeros((0, size, size), bool)
    boxes = mini_mask_boxes(torch.as_tensor(gt_boxes))
    return expand_masks(torch.as_tensor(np.asarray(mini)), boxes, size, size).numpy()


def read_rows(shards: str, split: str, *, start: int = 0, count: int = 1, image_id: int | None = None):
    """(rows, manifest): `count` consecutive rows of a split from position `start`, or the row of `image_id`.

    Read with pyarrow row group by row group, no Ray: a picture needs a few rows, not the split.
    """
    import pyarrow.parquet as pq

    from pipelines.shards import filesystem_for, read_manifest, shard_uris

    manifest = read_manifest(shards)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} is not in {shards} (has {', '.join(manifest['splits'])})")
    files = []
    for uri in shard_uris(shards, manifest, split):
        filesystem, path = filesystem_for(uri)
        files.append(pq.ParquetFile(filesystem.open_input_file(path)))
    if image_id is not None:
        offset = 0
        for pf in files:
            ids = pf.read(columns=["image_id"]).column(0).to_pylist()
            if image_id in ids:
                start, count = offset + ids.index(image_id), 1
                break
            offset += len(ids)
        else:
            raise ValueError(f"image {image_id} is not in split {split!r} of {shards}")
    rows: list[dict[str, Any]] = []
    offset = 0
    for pf in files:
        for group in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            if offset + n > start and len(rows) < count:
                table = pf.read_row_group(group)
                first = max(start - offset, 0)
                rows.extend(table.slice(first, count - len(rows)).to_pylist())
            offset += n
    if not rows:
        raise ValueError(f"split {split!r} of {shards} has {offset} rows: no row {start}")
    return rows, manifest


def load_sample(*, shards: str | None = None, dataset: str | None = None, split: str = "val2017",
                image_id: int | None = None, index: int = 0, config: Config | None = None) -> Sample:
    """The image to inspect: from the shards (their config, unless `config` is given: a model's, checked to
    share the shards' geometry by the caller) or from a COCO split processed by RowMaker with `config`."""
    if shards:
        rows, manifest = read_rows(shards, split, start=index, image_id=image_id)
        info = manifest["splits"][split]
        return Sample(config or Config.from_dict(manifest["config"]), CategoryMap.from_dict(manifest["categories"]),
                      rows[0], f"shards {shards} [{split}]", info.get("annotations"), info.get("images_root"))
    if not dataset:
        raise ValueError("give --shards SHARDS or --dataset DATASET (with --split)")
    from pipelines.coco_source import read_split, split_paths
    from pipelines.preprocess import RowMaker

    config = config or Config()
    annotations, images_root = split_paths(dataset, split)
    source = read_split(annotations, images_root)
    if image_id is not None:
        records = [r for r in source.records if r["image_id"] == image_id]
        if not records:
            raise ValueError(f"image {image_id} is not in {annotations}")
    else:
        if not 0 <= index < len(source.records):
            raise ValueError(f"--index {index}: {annotations} has {len(source.records)} images")
        records = [source.records[index]]
    raw, reports = RowMaker(config.to_dict(), torch_threads=None).make(records[0])
    if raw is None:
        raise ValueError(f"image {records[0]['image_id']} cannot be processed: {reports}")
    return Sample(config, source.categories, raw, f"dataset {dataset} [{split}]", annotations, images_root, records[0])


def _describe(sample: Sample) -> str:
    r = sample.row
    return (f"image {sample.image_id} ({r['width']}x{r['height']} px, scale {r['scale']:.3f}, "
            f"window {tuple(int(v) for v in r['window'])})\nfrom {sample.source}")


# ---------------------------------------------------------------------------------------------- stages
def gt_picture(sample: Sample, path: str | os.PathLike) -> dict[str, Any]:
    """The stored image with its gt masks (mini-masks expanded), boxes, class names and crowd regions."""
    r = sample.row
    g, c = len(r["gt_class_ids"]), len(r["crowd_boxes"])
    title = (f"gt: {g} instances, {c} crowd regions\n{_describe(sample)}\n"
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


def _anchor_kwargs(config: Config) -> dict[str, Any]:
    rpn = config.rpn
    return {"image_size": config.image.max_dim, "scales": rpn.anchor_scales, "feature_strides": rpn.feature_strides,
            "ratios": rpn.anchor_ratios, "anchor_stride": rpn.anchor_stride}


def anchors_picture(config: Config, path: str | os.PathLike, sample: Sample | None = None) -> dict[str, Any]:
    """Anchors of every ratio at three positions of each level (centre, and a quarter in from two corners),
    every anchor centre of the coarser levels as a dot, and the counts; on the sample's image when given."""
    from mrcnn.anchors import anchors_per_level, generate_anchors

    kwargs = _anchor_kwargs(config)
    anchors = generate_anchors(**kwargs).numpy()
    per_level = anchors_per_level(**kwargs)
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
    from mrcnn.rpn_targets import sample_anchors

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
             f"{len(s_pos)} positive + {len(s_neg)} negative\n{_describe(sample)}")
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
    from mrcnn.geometry import coco_bbox_to_box
    from mrcnn.mini_masks import expand_masks, mini_mask_boxes
    from pipelines.coco_source import annotation_mask

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
             f"{_describe(sample)}\nshowing {shown} of {g}; expanded: white both, red original only, "
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
    from torchvision.ops import box_iou

    from mrcnn.box_coder import decode

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
             f"{_describe(sample)}")
    pic = Picture(1, 2, panel=panel_px(sample.size), title=title)
    for col, (boxes, caption) in enumerate(((anchors, "positive anchors, coloured by their gt box"),
                                            (decoded, "anchors + stored deltas: should sit on the gt"))):
        ax = pic.axes(0, col, f"{caption}\ngt boxes dashed white")
        show_image(ax, sample.canvas)
        draw_boxes(ax, boxes, colors, linewidth=0.9)
        draw_boxes(ax, gt, GT, linewidth=1.2, linestyle="--")
    return pic.save(path, {"positives": len(pos), "max_error_px": error, "min_iou": min_iou})


# ---------------------------------------------------------------------------------------------- the command
@dataclass(frozen=True)
class InspectRequest:
    stage: str  # one of STAGES, or "all"
    out: str  # the PNG; a folder for "all" (one STAGE.png each)
    shards: str | None = None
    dataset: str | None = None
    split: str = "val2017"
    image_id: int | None = None
    index: int = 0
    model_path: str | None = None  # checkpoint directory or MLflow model URI; None: an untrained model
    config: Config | None = None  # for --dataset without a model, and anchors without data; default coco
    threshold: float | None = None
    step: int = 0  # the train step whose flips `batch` shows
    seed: int = 0
    mlflow_run: str | None = None
    tracking_uri: str | None = None
    experiment: str = "mrcnn-pipeline"


def run_inspect(request: InspectRequest) -> dict[str, Any]:
    """Write the stage's picture (every stage's, into a folder, for "all"); returns {stage: numbers}, and
    "mlflow_run" when the pictures were logged (to --mlflow-run, or to a new run for "all"). Under "all" a stage
    that cannot be drawn (batch without shards, original annotations out of reach) is {"skipped": why}."""
    from pipelines import inspect_model

    if request.stage not in (*STAGES, "all"):
        raise ValueError(f"unknown stage {request.stage!r}: one of {', '.join(STAGES)}, all")
    stages = STAGES if request.stage == "all" else (request.stage,)
    uses_model = any(s in MODEL_STAGES for s in stages)
    spec = None
    if request.model_path and uses_model:
        from pipelines.evaluate import check_model_fits, model_spec
        from pipelines.shards import read_manifest

        spec = model_spec(request.model_path)
        if request.shards:
            check_model_fits(spec, read_manifest(request.shards))
    # the shards' own config unless a model's (just checked to share their geometry)
    config = spec.config if spec else (None if request.shards else request.config)
    sample = None
    if request.shards or request.dataset or any(s not in ("anchors", "batch") for s in stages):
        sample = load_sample(shards=request.shards, dataset=request.dataset, split=request.split,
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
        "batch": lambda p: inspect_model.batch_picture(request.shards, request.split, p, index=request.index,
                                                       step=request.step, config=config),
        "predictions": lambda p: inspect_model.predictions_picture(run, p),
    }
    results: dict[str, Any] = {}
    for stage in stages:
        if request.stage != "all":
            if stage == "batch" and not request.shards:
                raise ValueError("stage 'batch' shows the loader's output: give --shards")
            results[stage] = draw[stage](request.out)
        elif stage == "batch" and not request.shards:
            results[stage] = {"skipped": "needs --shards"}
        else:
            try:
                results[stage] = draw[stage](os.path.join(request.out, f"{stage}.png"))
            except (ValueError, OSError) as exc:  # one stage out of reach must not cost the others
                results[stage] = {"skipped": f"{type(exc).__name__}: {exc}"}
    if request.mlflow_run or request.stage == "all":
        from pipelines import tracking

        uri = tracking.resolve_tracking_uri(request.tracking_uri)
        run_id = request.mlflow_run or tracking.create_run(
            uri, experiment=request.experiment, run_name="inspect",
            tags={"stage": "inspect", "source": sample.source if sample else "config"})
        for info in results.values():
            if "path" in info:
                tracking.log_artifact(uri, run_id, info["path"], "inspect")
        if not request.mlflow_run:
            tracking.finish_run(uri, run_id)
        results["mlflow_run"] = run_id
    return results

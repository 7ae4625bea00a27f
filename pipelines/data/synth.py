"""A synthetic COCO 2017-style dataset of shapes, for the demo and the tests.

`make_synthetic_dataset(out, train=..., val=...)` writes the layout the real COCO release uses:

    OUT/train2017/000000000001.jpg ...        OUT/annotations/instances_train2017.json
    OUT/val2017/000000500001.jpg ...          OUT/annotations/instances_val2017.json

Each image shows circles, squares and triangles in random colours over a textured background (noise,
gradient or stripes). Later shapes are painted over earlier ones, so every instance's mask is its VISIBLE
part; an instance left with too little visible area is dropped and not painted at all, so no unlabelled
slivers remain. The dataset deliberately exercises what real COCO files contain:

- non-contiguous category ids (1 circle, 3 square, 7 triangle) with names and a supercategory;
- polygon segmentations (un-occluded squares and triangles), compressed RLE (circles, occluded shapes;
  `counts` a str) and `iscrowd=1` regions (clusters of small shapes) as UNCOMPRESSED RLE (`counts` a list);
- images of independent random width and height in [min_size, max_size], a few grayscale (mode L) JPEGs
  and a few images without annotations;
- `area` = mask pixel count and `bbox` = `pycocotools.mask.toBbox` of the visible mask ([x, y, w, h]).

Masks are exact by construction: polygon shapes are rasterised by pycocotools itself from the very
(rounded) vertices stored in the JSON, and circles by the pixel-centre test, so `COCO.annToMask`
gives back the painted pixels. Every image is drawn from its own generator seeded with
(seed, split, index), so a seed gives byte-identical JSON and JPEGs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
)


CIRCLE, SQUARE, TRIANGLE = 1, 3, 7


SPLITS = {"train": ("train2017", 0, 1), "val": ("val2017", 1, 500_001)}  # folder, seed code, first image id


ANNOTATION_ID_BASE = {"train": 1, "val": 1_000_001}


JPEG_QUALITY = 95


OBJECT_SIZE = (12.0, 60.0)  # shape diameter / side in pixels, for a 128 px model input


MAX_SHAPES = 6


MIN_VISIBLE_PIXELS = 30


MIN_VISIBLE_FRACTION = 0.3  # of the shape's full area


# Image kinds by index, so even a handful of images has each kind (index 0 is always a plain image).
EMPTY_EVERY, EMPTY_AT = 9, 4


GRAY_EVERY, GRAY_AT = 7, 2


CROWD_EVERY, CROWD_AT = 5, 1


@dataclass
class SynthInstance:
    """One annotated region of a rendered image.

    mask: [H, W] bool, the visible pixels (what the annotation encodes);
    full_mask: [H, W] bool, the whole shape before later shapes covered it;
    segmentation: the COCO segmentation as written to the JSON (polygon list or RLE dict).
    """

    category_id: int
    iscrowd: int
    mask: np.ndarray
    full_mask: np.ndarray
    colour: tuple[int, int, int]
    segmentation: Any


@dataclass
class SynthImage:
    """One rendered image before JPEG encoding: pixels [H, W, 3] uint8 RGB (converted to L when grayscale)."""

    image: np.ndarray
    grayscale: bool
    instances: list[SynthInstance] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass
class _Layer:
    category_id: int
    iscrowd: int
    full_mask: np.ndarray
    colours: list[tuple[tuple[int, int, int], np.ndarray]]  # (colour, part mask) painted in order
    polygon: list[float] | None  # exact polygon (squares, triangles), else None


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split][1], index])


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured background [H, W, 3] float32 in 0..255: blotchy noise, a linear gradient or stripes."""
    kind = ("noise", "gradient", "stripes")[int(rng.integers(3))]
    c0 = rng.uniform(30, 225, size=3)
    c1 = np.clip(c0 + rng.uniform(-90, 90, size=3), 0, 255)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    if kind == "noise":
        coarse = rng.normal(0, 35, size=(height // 16 + 2, width // 16 + 2, 3)) + c0
        coarse_img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
        bg = np.asarray(coarse_img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    else:
        theta = rng.uniform(0, math.pi)
        along = xx * math.cos(theta) + yy * math.sin(theta)
        if kind == "gradient":
            t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
        else:
            period = rng.uniform(6, 20)
            t = 0.5 + 0.5 * np.sin(2 * math.pi * along / period)
        bg = c0 + t[..., None] * (c1 - c0)
    return (bg + rng.normal(0, 4, size=(height, width, 3))).astype(np.float32)


def _shape_colour(rng: np.random.Generator, background_mean: np.ndarray) -> tuple[int, int, int]:
    """A random colour that stands out from the background, in colour and in luminance (grayscale images)."""
    luma = np.array([0.299, 0.587, 0.114])
    colour = rng.integers(0, 256, size=3)
    for _ in range(30):
        if np.abs(colour - background_mean).sum() >= 150 and abs(luma @ (colour - background_mean)) >= 40:
            break
        colour = rng.integers(0, 256, size=3)
    return int(colour[0]), int(colour[1]), int(colour[2])


def _polygon_mask(polygon: list[float], height: int, width: int) -> np.ndarray:
    """[H, W] bool: pycocotools' own rasterisation, so the stored polygon reproduces the mask exactly."""
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    return mask_utils.decode(rle).astype(bool)


def _circle_mask(cx: float, cy: float, radius: float, height: int, width: int) -> np.ndarray:
    # Pixel (i, j) covers [j, j+1) x [i, i+1); it belongs to the circle when its centre does.
    yy, xx = np.mgrid[0:height, 0:width]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius**2


def _place(rng: np.random.Generator, offsets: np.ndarray, height: int, width: int) -> np.ndarray:
    """Shift vertex offsets [V, 2] (x, y) about a centre chosen so every vertex lies inside the image."""
    lo, hi = offsets.min(axis=0), offsets.max(axis=0)
    cx = rng.uniform(0.5 - lo[0], width - 0.5 - hi[0])
    cy = rng.uniform(0.5 - lo[1], height - 0.5 - hi[1])
    return offsets + np.array([cx, cy])


def _shape_mask(
    rng: np.random.Generator, category_id: int, size: float, height: int, width: int, centre=None
) -> tuple[np.ndarray, list[float] | None]:
    """One shape of diameter / side `size`: ([H, W] bool mask, polygon [x0, y0, x1, y1, ...] or None)."""
    if category_id == CIRCLE:
        r = size / 2
        if centre is None:
            cx, cy = rng.uniform(r + 0.5, width - r - 0.5), rng.uniform(r + 0.5, height - r - 0.5)
        else:
            cx, cy = centre
        return _circle_mask(cx, cy, r, height, width), None
    if category_id == SQUARE:
        angle = 0.0 if rng.random() < 0.4 else rng.uniform(0, math.pi / 2)
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * size / 2
    else:
        angle = rng.uniform(0, 2 * math.pi)
        turns = np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.35, 0.35, size=3)
        corners = np.stack([np.cos(turns), np.sin(turns)], axis=1) * size / 2
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    offsets = corners @ rot.T
    vertices = offsets + np.array(centre) if centre is not None else _place(rng, offsets, height, width)
    vertices = np.clip(vertices, 0.0, [width, height])
    # Rounded once; the mask is rasterised from exactly the numbers the JSON will hold.
    polygon = [round(float(v), 2) for v in vertices.reshape(-1)]
    return _polygon_mask(polygon, height, width), polygon


def _crowd_layer(rng: np.random.Generator, height: int, width: int, bg_mean: np.ndarray) -> _Layer:
    """A cluster of 5-10 small shapes of one category, annotated as one iscrowd=1 region."""
    category_id = int(rng.choice([CIRCLE, SQUARE, TRIANGLE]))
    spread = rng.uniform(12, min(30.0, min(height, width) / 3))
    cx = rng.uniform(spread + 6, width - spread - 6)
    cy = rng.uniform(spread + 6, height - spread - 6)
    full = np.zeros((height, width), dtype=bool)
    parts = []
    for _ in range(int(rng.integers(5, 11))):
        size = rng.uniform(6, 11)
        centre = (cx + rng.uniform(-spread, spread), cy + rng.uniform(-spread, spread))
        part, _ = _shape_mask(rng, category_id, size, height, width, centre=centre)
        full |= part
        parts.append((_shape_colour(rng, bg_mean), part))
    return _Layer(category_id, 1, full, parts, None)


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO crowd-style RLE: column-major run lengths starting with a run of zeros, counts a list of ints."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = [int(c) for c in np.diff(bounds)]
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def render_image(seed: int, split: str, index: int, *, min_size: int = 96, max_size: int = 192) -> SynthImage:
    """Render image `index` of `split` ('train' or 'val') for `seed`, with its instances' exact masks.

    Pure function of its arguments: the dataset writer and the tests call it alike.
    """
    rng = _rng(seed, split, index)
    height = int(rng.integers(min_size, max_size + 1))
    width = int(rng.integers(min_size, max_size + 1))
    canvas = _background(rng, height, width)
    bg_mean = canvas.reshape(-1, 3).mean(axis=0)

    layers: list[_Layer] = []
    if index % EMPTY_EVERY != EMPTY_AT:
        if index % CROWD_EVERY == CROWD_AT:
            layers.append(_crowd_layer(rng, height, width, bg_mean))
        max_object = min(OBJECT_SIZE[1], 0.5 * min(height, width))
        for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
            category_id = int(rng.choice([CIRCLE, SQUARE, TRIANGLE]))
            mask, polygon = _shape_mask(rng, category_id, rng.uniform(OBJECT_SIZE[0], max_object), height, width)
            layers.append(_Layer(category_id, 0, mask, [(_shape_colour(rng, bg_mean), mask)], polygon))

    # Top-down: a layer is kept when enough of it shows under the kept layers above it; a dropped layer
    # is not painted, so what covers the layers below it is exactly the union of kept layers above.
    kept: list[tuple[_Layer, np.ndarray]] = []
    covered = np.zeros((height, width), dtype=bool)
    for layer in reversed(layers):
        visible = layer.full_mask & ~covered
        full_area = int(layer.full_mask.sum())
        if visible.sum() >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * full_area):
            kept.append((layer, visible))
            covered |= layer.full_mask
    kept.reverse()

    instances = []
    for layer, visible in kept:  # bottom to top
        for colour, part in layer.colours:
            canvas[part] = np.asarray(colour, dtype=np.float32) + rng.normal(0, 3, size=(int(part.sum()), 3))
        if layer.iscrowd:
            segmentation: Any = _uncompressed_rle(visible)
        elif layer.polygon is not None and np.array_equal(visible, layer.full_mask):
            segmentation = [layer.polygon]
        else:
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        instances.append(SynthInstance(layer.category_id, layer.iscrowd, visible, layer.full_mask,
                                       layer.colours[0][0], segmentation))
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return SynthImage(pixels, index % GRAY_EVERY == GRAY_AT, instances)


def _annotation(ann_id: int, image_id: int, inst: SynthInstance) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": inst.category_id,
        "segmentation": inst.segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": inst.iscrowd,
    }


def _write_split(root: Path, split: str, count: int, seed: int, min_size: int, max_size: int) -> dict[str, Any]:
    folder, _, first_id = SPLITS[split]
    images_dir = root / folder
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = ANNOTATION_ID_BASE[split]
    for index in range(count):
        sample = render_image(seed, split, index, min_size=min_size, max_size=max_size)
        image_id = first_id + index
        file_name = f"{image_id:012d}.jpg"
        picture = Image.fromarray(sample.image, "RGB")
        if sample.grayscale:
            picture = picture.convert("L")
        picture.save(images_dir / file_name, "JPEG", quality=JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "height": sample.height, "width": sample.width,
                       "license": 1})
        for inst in sample.instances:
            annotations.append(_annotation(ann_id, image_id, inst))
            ann_id += 1
    data = {
        "info": {"description": "mrcnn-pipeline synthetic shapes", "version": "1.0", "year": 2017,
                 "contributor": "pipelines.synth", "seed": seed, "split": split},
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }
    annotations_path = root / "annotations" / f"instances_{folder}.json"
    annotations_path.parent.mkdir(parents=True, exist_ok=True)
    annotations_path.write_text(json.dumps(data, sort_keys=True))
    return {
        "images_dir": str(images_dir),
        "annotations": str(annotations_path),
        "num_images": len(images),
        "num_annotations": len(annotations),
        "num_crowd": sum(a["iscrowd"] for a in annotations),
    }


def make_synthetic_dataset(
    out_dir: str | Path, *, train: int, val: int, seed: int = 0, min_size: int = 96, max_size: int = 192
) -> dict[str, Any]:
    """Write `train` + `val` synthetic images and their COCO annotations under `out_dir` (local path).

    Returns {"root", "categories", "train": {"images_dir", "annotations", "num_images", "num_annotations",
    "num_crowd"}, "val": {...}}. Existing files of the same names are overwritten.
    """
    if train < 0 or val < 0:
        raise ValueError(f"image counts must be >= 0, got train={train}, val={val}")
    if not 32 <= min_size <= max_size:
        raise ValueError(f"need 32 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    root = Path(out_dir)
    result: dict[str, Any] = {"root": str(root), "categories": [dict(c) for c in CATEGORIES]}
    for split, count in (("train", train), ("val", val)):
        result[split] = _write_split(root, split, count, seed, min_size, max_size)
    return result

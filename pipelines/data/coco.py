"""Reading one COCO-format split (annotations JSON + image folder) for the pipeline stages.

Paths are local paths or URIs (`s3://`, `gs://`, ...); URIs are opened through `pyarrow.fs`, so every node
of a Ray cluster reads the same data. The annotations file is read once, checked record by record and
indexed with pycocotools; each bad record is skipped (or repaired) and reported, the rest kept:

    source = read_split(*split_paths("s3://bucket/coco", "train2017"))
    source.records[0]   # {"image_id", "file_name", "path", "height", "width", "annotations": [...]}
    source.skipped      # [{"image_id", "file", "annotation_id", "reason", "action"}, ...]

A reason is a stable slug, then a colon and detail: `duplicate_image_id`, `malformed_image`, `unsafe_path`,
`skipped_image` (annotation of a skipped image), `missing_image_record`, `malformed_annotation`,
`unknown_category`, `degenerate_polygon`, `malformed_segmentation`, `zero_area_box`, `box_outside_image`,
`bbox_clipped`. `action` is "skipped" or "repaired" (`bbox_clipped`, and `degenerate_polygon` when other
polygon parts remain).

Image files are not checked here (a listing of a bucket costs more than the checks are worth); the
preprocess workers decode them with `load_image_rgb`, which names what is wrong with a bad file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

from pipelines.data.categories import CategoryMap
from pipelines.data.errors import DatasetError, ImageError, UnsafePathError
from pipelines.infra.storage import is_uri, read_bytes


def split_paths(dataset: str | os.PathLike, split: str) -> tuple[str, str]:
    """(annotations file, images folder) of a COCO 2017-style split, e.g. ("D/annotations/instances_val2017.json",
    "D/val2017") for `split_paths("D", "val2017")`. `D` may be a local path or a URI; joined with '/'."""
    root = os.fspath(dataset).rstrip("/")
    return f"{root}/annotations/instances_{split}.json", f"{root}/{split}"


def safe_image_path(images_root: str | os.PathLike, file_name: str) -> str:
    """images_root + '/' + file_name, refusing names that would leave images_root.

    Sub-folders are fine ("a/b.jpg", "a/../b.jpg" -> "b.jpg"); refused: empty names, absolute paths,
    '..' escapes, URIs, backslashes, drive letters and NUL bytes.
    """
    if not isinstance(file_name, str) or not file_name:
        raise UnsafePathError(f"unsafe image file name {file_name!r}: empty or not a string")
    normal = posixpath.normpath(file_name)
    why = None
    if "\x00" in file_name:
        why = "contains a NUL byte"
    elif "\\" in file_name:
        why = "contains a backslash"
    elif is_uri(file_name) or re.match(r"^[A-Za-z]:", file_name):
        why = "is a URI or drive path"
    elif file_name.startswith("/"):
        why = "is an absolute path"
    elif normal == ".." or normal.startswith("../"):
        why = "escapes the images folder"
    elif normal == ".":
        why = "names the folder itself"
    if why:
        raise UnsafePathError(f"unsafe image file name {file_name!r}: {why}")
    return f"{os.fspath(images_root).rstrip('/')}/{normal}"


@dataclass
class SplitSource:
    """One checked split. records: one dict per kept image, in file order (see `read_split`)."""

    records: list[dict[str, Any]]
    categories: CategoryMap
    skipped: list[dict[str, Any]]
    annotations_sha256: str
    num_images_total: int
    num_annotations_total: int = 0
    coco: COCO | None = field(default=None, repr=False, compare=False)  # the kept records, original category ids

    @property
    def num_annotations(self) -> int:
        return sum(len(r["annotations"]) for r in self.records)


def _load_json(annotations: str) -> tuple[dict[str, Any], str]:
    try:
        raw = read_bytes(annotations)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise DatasetError(f"annotations file not found: {annotations}") from e
    except OSError as e:
        raise DatasetError(f"cannot read annotations file {annotations}: {e}") from e
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DatasetError(f"malformed JSON in annotations file {annotations}: {e}") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"annotations file {annotations} is not UTF-8 text: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"annotations file {annotations}: expected a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"annotations file {annotations}: missing or non-list {key!r}")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"annotations file {annotations}: 'annotations' is not a list")
    return data, hashlib.sha256(raw).hexdigest()


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_segmentation(seg: Any, height: int, width: int) -> tuple[Any, str | None, str | None]:
    """(segmentation to keep or None, skip reason, repair reason)."""
    if isinstance(seg, list):
        parts = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                 and all(_is_number(v) for v in p)]
        if not parts:
            return None, f"degenerate_polygon: no polygon with >= 3 points among {len(seg)} part(s)", None
        if len(parts) < len(seg):
            return parts, None, f"degenerate_polygon: dropped {len(seg) - len(parts)} of {len(seg)} part(s)"
        return seg, None, None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = seg["size"]
        if not (isinstance(size, list) and len(size) == 2 and [int(size[0]), int(size[1])] == [height, width]):
            return None, f"malformed_segmentation: RLE size {size} is not the image's [{height}, {width}]", None
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                return None, "malformed_segmentation: uncompressed RLE counts do not cover the image", None
        elif not isinstance(counts, str):
            return None, "malformed_segmentation: RLE counts neither str nor list", None
        return seg, None, None
    return None, f"malformed_segmentation: {type(seg).__name__} is neither polygons nor RLE", None


def read_split(annotations: str | os.PathLike, images_root: str | os.PathLike) -> SplitSource:
    """Read and check one split: `annotations` JSON (local path or URI), images under `images_root`.

    Each record: {"image_id": int, "file_name": str, "path": str (images_root joined safely), "height": int,
    "width": int, "annotations": [{"id", "category_id" (contiguous 1..K), "bbox" [x, y, w, h] original
    pixels (clipped to the image), "segmentation" (as in the JSON, minus degenerate polygon parts),
    "iscrowd" 0/1, "area"}]}. Images without annotations are kept. Raises DatasetError, naming the file,
    when the file is missing, is not JSON, or lacks the "images" / "categories" lists.
    """
    annotations, images_root = os.fspath(annotations), os.fspath(images_root)
    data, sha = _load_json(annotations)
    categories = CategoryMap.from_coco(data["categories"])
    skipped: list[dict[str, Any]] = []

    def report(image_id, file, ann_id, reason, action="skipped"):
        skipped.append({"image_id": image_id, "file": file, "annotation_id": ann_id, "reason": reason,
                        "action": action})

    images: dict[int, dict[str, Any]] = {}
    bad_image_ids: set[Any] = set()
    for img in data["images"]:
        image_id = img.get("id") if isinstance(img, dict) else None
        file_name = img.get("file_name") if isinstance(img, dict) else None
        if not (isinstance(img, dict) and isinstance(image_id, int) and isinstance(file_name, str)
                and isinstance(img.get("height"), int) and isinstance(img.get("width"), int)
                and img["height"] > 0 and img["width"] > 0):
            report(image_id, file_name, None, "malformed_image: needs int id, str file_name, positive height/width")
            continue
        if image_id in images:
            report(image_id, file_name, None,
                   f"duplicate_image_id: id {image_id} already used by {images[image_id]['file_name']!r}")
            continue
        try:
            path = safe_image_path(images_root, file_name)
        except UnsafePathError as e:
            report(image_id, file_name, None, f"unsafe_path: {e}")
            bad_image_ids.add(image_id)
            continue
        images[image_id] = {"id": image_id, "file_name": file_name, "height": img["height"],
                            "width": img["width"], "path": path}

    kept_anns = []
    for ann in data.get("annotations", []):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        img = images.get(image_id) if isinstance(image_id, int) else None
        file = img["file_name"] if img else None
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if not (isinstance(ann, dict) and isinstance(ann_id, int) and isinstance(image_id, int)
                and isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
                and "category_id" in ann):
            report(image_id, file, ann_id, "malformed_annotation: needs int id/image_id, category_id, 4-number bbox")
            continue
        if img is None:
            if image_id in bad_image_ids:
                report(image_id, None, ann_id, f"skipped_image: image {image_id} was skipped")
            else:
                report(image_id, None, ann_id, f"missing_image_record: no image with id {image_id}")
            continue
        if not isinstance(ann["category_id"], int) or ann["category_id"] not in categories:
            report(image_id, file, ann_id, f"unknown_category: category id {ann['category_id']!r}")
            continue
        height, width = img["height"], img["width"]
        segmentation, skip, repair = _check_segmentation(ann.get("segmentation"), height, width)
        if skip:
            report(image_id, file, ann_id, skip)
            continue
        if repair:
            report(image_id, file, ann_id, repair, action="repaired")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            report(image_id, file, ann_id, f"zero_area_box: bbox {bbox}")
            continue
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
        if x2 <= x1 or y2 <= y1:
            report(image_id, file, ann_id, f"box_outside_image: bbox {bbox} vs image {width}x{height}")
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            bbox = [x1, y1, x2 - x1, y2 - y1]
            report(image_id, file, ann_id, f"bbox_clipped: {ann['bbox']} -> {bbox} in {width}x{height}",
                   action="repaired")
        iscrowd = 1 if ann.get("iscrowd") in (1, True) else 0
        area = ann.get("area")
        if not _is_number(area):
            area = float(mask_utils.area(_to_rle(segmentation, height, width)))
        kept_anns.append({**ann, "bbox": bbox, "segmentation": segmentation, "iscrowd": iscrowd, "area": area})

    # One pycocotools index over the kept records: the same ground truth the evaluation scores against.
    coco = COCO()
    coco.dataset = {**{k: v for k, v in data.items() if k not in ("images", "annotations")},
                    "images": [{k: v for k, v in im.items() if k != "path"} for im in images.values()],
                    "annotations": kept_anns}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()

    records = []
    for image_id, img in images.items():
        records.append({
            "image_id": image_id, "file_name": img["file_name"], "path": img["path"],
            "height": img["height"], "width": img["width"],
            "annotations": [
                {"id": a["id"], "category_id": categories.to_contiguous(a["category_id"]),
                 "bbox": [float(v) for v in a["bbox"]], "segmentation": a["segmentation"],
                 "iscrowd": a["iscrowd"], "area": float(a["area"])}
                for a in coco.imgToAnns.get(image_id, [])
            ],
        })
    return SplitSource(records, categories, skipped, sha, len(data["images"]), len(data.get("annotations", [])),
                       coco)


def _to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    if isinstance(segmentation, list):  # polygons: one RLE per part, merged
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE (crowd regions)
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation  # compressed RLE; pycocotools takes str counts as they are


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """[H, W] uint8 0/1 mask of an annotation's segmentation (polygons, compressed or uncompressed RLE)."""
    return mask_utils.decode(_to_rle(ann["segmentation"], height, width))


def load_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file (local path or URI) to [H, W, 3] uint8 RGB.

    Grayscale, CMYK, palette and alpha images are converted to RGB (alpha dropped). EXIF orientation is
    NOT applied: COCO's heights and widths are those of the stored pixels. Raises ImageError naming the
    file when it is missing, empty, not an image, or truncated / corrupt.
    """
    path = os.fspath(path)
    try:
        raw = read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise ImageError(f"image file not found: {path}") from e
    except OSError as e:
        raise ImageError(f"cannot read image file {path}: {e}") from e
    if not raw:
        raise ImageError(f"empty image file (0 bytes): {path}")
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()  # decode everything now: a truncated JPEG fails here, not later in a worker's batch
    except UnidentifiedImageError as e:
        raise ImageError(f"not a recognised image file: {path}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"truncated or corrupt image file {path}: {e}") from e
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float grayscale: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit samples scale by 255/65535; 32-bit "I" (old Pillow's 16-bit PNGs) only when above 8 bits.
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max() > 255):
            arr = arr / 257.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=2))
    if img.mode != "RGB":
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # PIL asks palette images with transparency to go through RGBA
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()

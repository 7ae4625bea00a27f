"""Reading one COCO-format split (annotations JSON + image folder) for the pipeline stages.

Paths are local paths or URIs (`s3://`, `gs://`, ...); URIs are opened through `pyarrow.fs`, so every node
of a Ray cluster reads the same data. The annotations file is read once, checked record by record and
indexed with pycocotools; each bad record is skipped (or repaired) and reported, the rest kept:

    source = read_split(*split_paths("s3://bucket/coco", "train2017"))
    source.records[0]   # {"image_id", "file_name", "path", "height", "width", "annotations": [...]}
    source.skipped      # [{"image_id", "file", "annotation_id", "reason", "action"}, ...]

A reason is a stable slug, then a colon and detail: `duplicate_image_id`, `malformed_image`, `unsafe_path`,
`skipped_image` (annotation of a skipped image), `missing_image_record`, `malformed_annotation`,
`duplicate_annotation_id`, `unknown_category`, `degenerate_polygon`, `malformed_segmentation`, `zero_area_box`,
`box_outside_image`, `bbox_clipped`, `area_recomputed`. `action` is "skipped" or "repaired" (`bbox_clipped`,
`area_recomputed`, and `degenerate_polygon` when other polygon parts remain).

What counts as well-formed is said in `pipelines.data.coco_checks`. The first record with an id claims it, even
when that record is skipped: later records with the same id are duplicates, and annotations of a skipped image
are `skipped_image`.

Image files are not checked here (a listing of a bucket costs more than the checks are worth); the
preprocess workers decode them with `load_image_rgb`, which names what is wrong with a bad file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
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
from pipelines.data.coco_checks import check_segmentation, image_problem, is_int, is_number, short, skip_report
from pipelines.data.errors import DatasetError, ImageError, ImageTooLargeError, UnsafePathError
from pipelines.data.images import loader_reads
from pipelines.infra.storage import is_uri, read_bytes


def split_paths(dataset: str | os.PathLike, split: str) -> tuple[str, str]:
    """(annotations file, images folder) of a COCO 2017-style split, e.g. ("D/annotations/instances_val2017.json",
    "D/val2017") for `split_paths("D", "val2017")`. `D` may be a local path or a URI; joined with '/'."""
    root = os.fspath(dataset).rstrip("/")
    return f"{root}/annotations/instances_{split}.json", f"{root}/{split}"


def safe_image_path(images_root: str | os.PathLike, file_name: str) -> str:
    """images_root + '/' + file_name, refusing names that would leave images_root.

    Sub-folders are fine ("a/b.jpg", "a/../b.jpg" -> "b.jpg"); refused: empty names, absolute paths,
    '..' escapes, URIs, backslashes, drive letters, NUL bytes and lone surrogates (no file system name).
    """
    if not isinstance(file_name, str) or not file_name:
        raise UnsafePathError(f"unsafe image file name {file_name!r}: empty or not a string")
    normal = posixpath.normpath(file_name)
    why = None
    if "\x00" in file_name:
        why = "contains a NUL byte"
    elif not _is_utf8(file_name):
        why = "is not valid Unicode (a lone surrogate)"
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


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, which JSON's \ud800 escapes can make
        return False
    return True


def _read(path: str, what: str, error: type[Exception]) -> bytes:
    """The bytes of a local file or URI, or `error` naming it: `<what> file not found: PATH` (missing, a folder, or
    under something that is not one), `cannot read <what> file PATH: <why>` (any other OSError)."""
    try:
        return read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise error(f"{what} file not found: {path}") from e
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {e}") from e


def _load_json(annotations: str) -> tuple[dict[str, Any], str]:
    raw = _read(annotations, "annotations", DatasetError)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DatasetError(f"malformed JSON in annotations file {annotations}: {e}") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"annotations file {annotations} is not UTF-8 text: {e}") from e
    except RecursionError as e:
        raise DatasetError(f"annotations file {annotations}: JSON nested too deeply to read") from e
    except ValueError as e:  # e.g. an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise DatasetError(f"cannot read annotations file {annotations}: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"annotations file {annotations}: expected a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"annotations file {annotations}: missing or non-list {key!r}")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"annotations file {annotations}: 'annotations' is not a list")
    return data, hashlib.sha256(raw).hexdigest()


def read_split(annotations: str | os.PathLike, images_root: str | os.PathLike) -> SplitSource:
    """Read and check one split: `annotations` JSON (local path or URI), images under `images_root`.

    Each record: {"image_id": int, "file_name": str, "path": str (images_root joined safely), "height": int,
    "width": int, "annotations": [{"id", "category_id" (contiguous 1..K), "bbox" [x, y, w, h] original
    pixels (clipped to the image), "segmentation" (as in the JSON, minus degenerate polygon parts),
    "iscrowd" 0/1, "area" (the JSON's when a number >= 0, else computed from the segmentation)}]}. Images
    without annotations are kept; a file without "annotations" is an image-info-only split. Raises
    DatasetError, naming the file, when the file is missing, is not JSON, lacks the "images" / "categories"
    lists, or has a malformed or repeated category (the class map needs every one).
    """
    annotations, images_root = os.fspath(annotations), os.fspath(images_root)
    data, sha = _load_json(annotations)
    try:
        categories = CategoryMap.from_coco(data["categories"])
    except DatasetError as e:
        raise DatasetError(f"annotations file {annotations}: {e}") from e
    skips = _Skips()
    images, bad_image_ids = _check_images(data["images"], images_root, skips)
    kept_anns = _check_annotations(data.get("annotations", []), images, bad_image_ids, categories, skips)
    coco = _coco_index(data, images, kept_anns)
    records = [_record(image_id, img, coco.imgToAnns.get(image_id, []), categories)
               for image_id, img in images.items()]
    return SplitSource(records, categories, skips.reports, sha, len(data["images"]),
                       len(data.get("annotations", [])), coco)


class _Skips:
    """The skip report of a split: one entry per image or annotation skipped (or repaired), in the file's order."""

    def __init__(self):
        self.reports: list[dict[str, Any]] = []

    def __call__(self, image_id, file, ann_id, reason, action="skipped"):
        self.reports.append(skip_report(image_id, file, ann_id, reason, action))


def _check_images(entries: list, images_root: str, report: _Skips) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """The JSON's "images" -> ({id: {id, file_name, height, width, path}} of the usable ones, the ids of the
    first records that were skipped (their annotations are reported as such)). The first record of an id claims it."""
    images: dict[int, dict[str, Any]] = {}
    claimed: dict[int, Any] = {}  # image id -> file name of the first record with it, kept or not
    bad_image_ids: set[int] = set()
    for img in entries:
        image_id = img.get("id") if isinstance(img, dict) else None
        file_name = img.get("file_name") if isinstance(img, dict) else None
        problem = image_problem(img)
        first = is_int(image_id) and image_id not in claimed
        if first:
            claimed[image_id] = file_name
        if problem is not None:
            report(image_id, file_name, None, f"malformed_image: {problem}")
            if first:
                bad_image_ids.add(image_id)
            continue
        if not first:
            report(image_id, file_name, None,
                   f"duplicate_image_id: id {image_id} already used by {short(claimed[image_id])}")
            continue
        try:
            path = safe_image_path(images_root, file_name)
        except UnsafePathError as e:
            report(image_id, file_name, None, f"unsafe_path: {e}")
            bad_image_ids.add(image_id)
            continue
        images[image_id] = {"id": image_id, "file_name": file_name, "height": img["height"],
                            "width": img["width"], "path": path}
    return images, bad_image_ids


def _check_annotations(entries: list, images: dict[int, dict[str, Any]], bad_image_ids: set[int],
                       categories: CategoryMap, report: _Skips) -> list[dict[str, Any]]:
    """The JSON's "annotations" -> the usable ones, repaired (bbox clipped to the image, degenerate polygon parts
    dropped, area computed where missing or invalid), each skip or repair reported."""
    kept_anns = []
    ann_ids: set[int] = set()  # every annotation id claimed so far, kept or not
    for ann in entries:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        img = images.get(image_id) if is_int(image_id) else None
        file = img["file_name"] if img else None
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        duplicate = is_int(ann_id) and ann_id in ann_ids
        if is_int(ann_id):
            ann_ids.add(ann_id)
        if not (isinstance(ann, dict) and is_int(ann_id) and is_int(image_id)
                and isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)
                and "category_id" in ann):
            report(image_id, file, ann_id, "malformed_annotation: needs int id/image_id, category_id, 4-number bbox")
            continue
        if ann.get("iscrowd", 0) not in (0, 1):  # 0, 1, 0.0, 1.0 and JSON booleans
            report(image_id, file, ann_id, f"malformed_annotation: iscrowd {short(ann['iscrowd'])} is not 0 or 1")
            continue
        if duplicate:
            report(image_id, file, ann_id, f"duplicate_annotation_id: id {ann_id} already used by an annotation")
            continue
        if img is None:
            if image_id in bad_image_ids:
                report(image_id, None, ann_id, f"skipped_image: image {image_id} was skipped")
            else:
                report(image_id, None, ann_id, f"missing_image_record: no image with id {image_id}")
            continue
        if not is_int(ann["category_id"]) or ann["category_id"] not in categories:
            report(image_id, file, ann_id, f"unknown_category: category id {short(ann['category_id'])}")
            continue
        kept = _repaired_annotation(ann, img, report)
        if kept is not None:
            kept_anns.append(kept)
    return kept_anns


def _repaired_annotation(ann: dict[str, Any], img: dict[str, Any], report: _Skips) -> dict[str, Any] | None:
    """One well-formed annotation of a usable image -> the annotation as kept (segmentation, bbox, iscrowd and
    area repaired, each repair reported), or None when its segmentation or box leaves nothing (reported)."""
    image_id, file, ann_id, bbox = img["id"], img["file_name"], ann["id"], ann["bbox"]
    height, width = img["height"], img["width"]
    segmentation, skip, repair = check_segmentation(ann.get("segmentation"), height, width)
    if skip:
        report(image_id, file, ann_id, skip)
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        report(image_id, file, ann_id, f"zero_area_box: bbox {bbox}")
        return None
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        report(image_id, file, ann_id, f"box_outside_image: bbox {bbox} vs image {width}x{height}")
        return None
    if repair:  # reported once the annotation is known to be kept
        report(image_id, file, ann_id, repair, action="repaired")
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        bbox = [x1, y1, x2 - x1, y2 - y1]
        report(image_id, file, ann_id, f"bbox_clipped: {ann['bbox']} -> {bbox} in {width}x{height}",
               action="repaired")
    iscrowd = 1 if ann.get("iscrowd") in (1, True) else 0
    area = ann.get("area")
    if not (is_number(area) and area >= 0):  # absent or null: computed; anything else: computed, reported
        computed = float(mask_utils.area(_to_rle(segmentation, height, width)))
        if area is not None:
            report(image_id, file, ann_id, f"area_recomputed: area {short(area)} -> {computed}", action="repaired")
        area = computed
    return {**ann, "bbox": bbox, "segmentation": segmentation, "iscrowd": iscrowd, "area": area}


def _coco_index(data: dict[str, Any], images: dict[int, dict[str, Any]], kept_anns: list[dict[str, Any]]) -> COCO:
    """One pycocotools index over the kept records: the same ground truth the evaluation scores against."""
    coco = COCO()
    coco.dataset = {**{k: v for k, v in data.items() if k not in ("images", "annotations")},
                    "images": [{k: v for k, v in im.items() if k != "path"} for im in images.values()],
                    "annotations": kept_anns}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def _record(image_id: int, img: dict[str, Any], anns: list[dict[str, Any]], categories: CategoryMap
            ) -> dict[str, Any]:
    """One image's record (the shape `read_split` documents), its annotations as the index holds them."""
    return {
        "image_id": image_id, "file_name": img["file_name"], "path": img["path"],
        "height": img["height"], "width": img["width"],
        "annotations": [
            {"id": a["id"], "category_id": categories.to_contiguous(a["category_id"]),
             "bbox": [float(v) for v in a["bbox"]], "segmentation": a["segmentation"],
             "iscrowd": a["iscrowd"], "area": float(a["area"])}
            for a in anns
        ],
    }


def _to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    if isinstance(segmentation, list):  # polygons: one RLE per part, merged
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE (crowd regions)
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation  # compressed RLE; pycocotools takes str counts as they are


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """[H, W] uint8 0/1 mask of an annotation's segmentation (polygons, compressed or uncompressed RLE)."""
    return mask_utils.decode(_to_rle(ann["segmentation"], height, width))


@dataclass(frozen=True)
class SourceImage:
    """An image file read and decoded once: data, its bytes; pixels, [H, W, 3] uint8 RGB (`load_image_rgb`), or
    None when not asked for and not needed; loader_reads, whether `pipelines.data.images.decode_image(data)` gives
    these pixels (so the bytes can be stored as they are) or the image must be re-encoded (CMYK, 16-bit, palette,
    alpha, formats other than JPEG/PNG); height, width: the stored pixels' size.
    """

    data: bytes = field(repr=False)
    pixels: np.ndarray | None = field(repr=False)
    loader_reads: bool
    height: int
    width: int


def load_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file (local path or URI) to [H, W, 3] uint8 RGB (`read_image(path).pixels`)."""
    return read_image(path).pixels


def read_image(path: str | os.PathLike, *, pixels: bool = True) -> SourceImage:
    """Read an image file (local path or URI) and decode it to [H, W, 3] uint8 RGB.

    Grayscale, CMYK, palette and alpha images are converted to RGB (alpha dropped). EXIF orientation is
    NOT applied: COCO's heights and widths are those of the stored pixels. Raises ImageError naming the
    file when it is missing, empty, not an image, truncated / corrupt, or more pixels than PIL decodes.
    With `pixels=False`, a JPEG the loader reads as it is (what preprocess stores unchanged) is decoded at 1/8
    scale (libjpeg's DCT scaling, about twice as fast): every coefficient of the file is still read, so a
    truncated or corrupt file fails just the same, and `pixels` is None. Other files are decoded in full.
    """
    path = os.fspath(path)
    return decode_image_bytes(_read(path, "image", ImageError), path, pixels=pixels)


def decode_image_bytes(raw: bytes, path: str, *, pixels: bool = True, max_pixels: int | None = None) -> SourceImage:
    """`read_image` of bytes already read; `path` names them in errors (a file, or a request). max_pixels: refuse an
    image of more pixels (ImageTooLargeError), read from its header before anything is decoded (a decompression
    bomb is a small file of huge dimensions)."""
    if not raw:
        raise ImageError(f"empty image file (0 bytes): {path}")
    try:
        img = Image.open(io.BytesIO(raw))
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(f"{path}: {width} x {height} = {width * height} pixels, more than the limit "
                                     f"{max_pixels}")
        if not pixels and img.format == "JPEG" and loader_reads(img, raw):
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()  # the whole entropy-coded stream, at 1/8 of the size
            return SourceImage(raw, None, True, height, width)
        img.load()  # decode everything now: a truncated JPEG fails here, not later in a worker's batch
    except ImageTooLargeError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"not a recognised image file: {path}") from e
    except Image.DecompressionBombError as e:  # not an OSError: PIL refuses to decode that many pixels
        raise ImageTooLargeError(f"image file too large to decode: {path}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"truncated or corrupt image file {path}: {e}") from e
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float grayscale: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit samples scale by 255/65535; 32-bit "I" (old Pillow's 16-bit PNGs) only when above 8 bits.
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max() > 255):
            arr = arr / 257.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return SourceImage(raw, np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=2)), False, height, width)
    readable = loader_reads(img, raw)
    if img.mode != "RGB":
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # PIL asks palette images with transparency to go through RGBA
        img = img.convert("RGB")
    return SourceImage(raw, np.asarray(img, dtype=np.uint8).copy(), readable, height, width)

"""Property-based tests (hypothesis) of `read_split` and `RowMaker.make` over generated COCO annotation files.

Each example of the main property is a whole annotations JSON: valid image records (with real tiny image files
behind them) and valid annotations, mixed with broken records that each carry ONE defect whose reason slug
(coco.py's module docstring) is known when the record is generated. The properties:

- a file whose top level is sound never raises; every broken record is reported exactly once, with its slug,
  image id, annotation id and file; a repaired one is kept AND reported with action "repaired"; every valid
  image and annotation is kept with the values the docstrings promise;
- `RowMaker.make` on every kept record returns a row (good image file, no report: pycocotools decodes every
  segmentation `read_split` kept) or no row and one report naming the file's problem; it never raises, and the
  workers' Arrow table takes every row;
- arbitrary JSON values as records never raise, and every record is accounted for (kept or reported);
- a file unusable as a whole raises DatasetError naming the file, and nothing else.

Examples are derandomized (the same on every run, in CI too). The records that broke the old code are plain
regression tests in test_record_regressions.py.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import posixpath
import re
import tempfile
from collections import Counter

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mrcnn.config import shapes
from pipelines.data import coco, coco_checks
from pipelines.data.coco import annotation_mask, read_split
from pipelines.data.errors import DatasetError
from pipelines.data.rows import RowMaker

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = ((12, 16), (20, 20), (9, 30))  # (height, width) of the real image files
NAN, INF = float("nan"), float("inf")
IMAGE_SLUGS = {"malformed_image", "duplicate_image_id", "unsafe_path"}  # reports about an image record
REPAIR_SLUGS = {"bbox_clipped", "degenerate_polygon", "area_recomputed"}
INT64 = 2**63
FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def maker():
    return RowMaker(shapes().to_dict(), torch_threads=None)


def _slug(report: dict) -> str:
    return report["reason"].split(":", 1)[0]


def _key(slug, action, image_id, ann_id, file) -> tuple:
    return slug, action, repr(image_id), repr(ann_id), repr(file)  # repr: NaN, lists and dicts compare too


def _proper_id(v) -> bool:
    return type(v) is int and -INT64 <= v < INT64


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


@functools.cache
def _image_bytes(h: int, w: int) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    buf = io.BytesIO()
    Image.fromarray(np.stack([xx * 9, yy * 13, xx + yy], axis=2).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts: column-major runs, starting with a (maybe empty) run of zeros."""
    flat = mask.ravel(order="F")
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def _area(seg, h: int, w: int) -> float:
    if isinstance(seg, list):
        return float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))))
    if isinstance(seg["counts"], list):
        return float(mask_utils.area(mask_utils.frPyObjects(seg, h, w)))
    return float(mask_utils.area(seg))


# ---------------------------------------------------------------------------------------------- strategies


def _quarters(lo: float, hi: float):
    """Multiples of 0.25 in [lo, hi]: box sums and differences stay exact in binary floating point."""
    return st.integers(math.ceil(lo * 4), math.floor(hi * 4)).map(lambda k: k / 4)


_SEGMENT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="/\\\x00"), min_size=1,
                   max_size=6).filter(lambda s: s not in (".", ".."))
UNSAFE_NAMES = ["../x.png", "a/../../x.png", "..", "/etc/passwd", "/abs/x.png", "a\\b.png", "s3://bucket/x.png",
                "C:x.png", "x\x00.png", "", ".", "a/..", "./", "\ud800.png", "a/\udfff/b.png"]
BAD_BBOXES = ["abc", None, 5, {"x": 1}, [1, 2, 3], [1, 2, 3, 4, 5], [NAN, 1, 2, 2], [1, INF, 2, 2],
              [1, 1, -INF, 2], ["1", 1, 2, 2], [True, 1, 2, 2], [10**400, 0, 1, 1], [None, 1, 2, 2]]
BAD_AREAS = ["60", NAN, -3.0, True, 10**400, INF, [60]]
BAD_ISCROWD = [2, -1, "1", None, 0.5, [1], NAN, "true"]


def _bad_part(h: int, w: int):
    """A polygon part pycocotools cannot use: 1-2 points, odd length, a non-number, or not a list."""
    coord = _quarters(0, min(h, w))
    wrong_value = st.tuples(st.lists(coord, min_size=6, max_size=6), st.integers(0, 5),
                            st.sampled_from(["a", None, NAN, INF, True, 10**400, [1]]))
    return st.one_of(
        st.sampled_from([0, 1, 2, 3, 4, 5, 7]).flatmap(lambda n: st.lists(coord, min_size=n, max_size=n)),
        wrong_value.map(lambda t: [*t[0][: t[1]], t[2], *t[0][t[1] + 1:]]),
        st.sampled_from([5, "x", None, {}, {"size": [h, w], "counts": "PPYo0"}]),
    )


@st.composite
def _polygon(draw, h: int, w: int) -> list:
    """1-3 parts of 3-6 points inside the image. A part may cover no pixel (3 collinear points): by design
    `read_split` does not rasterise to check, so such an annotation is kept (pycocotools keeps it too)."""
    points = st.lists(st.tuples(_quarters(0, w), _quarters(0, h)), min_size=3, max_size=6)
    return [[v for pt in part for v in pt] for part in draw(st.lists(points, min_size=1, max_size=3))]


@st.composite
def _mask(draw, h: int, w: int) -> np.ndarray:
    r0, c0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
    mask = np.zeros((h, w), np.uint8)
    mask[r0:draw(st.integers(r0 + 1, h)), c0:draw(st.integers(c0 + 1, w))] = 1
    return mask


def _rle_string(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask))["counts"].decode()


@st.composite
def _valid_segmentation(draw, h: int, w: int):
    kind = draw(st.sampled_from(["polygon", "rle_str", "rle_list"]))
    if kind == "polygon":
        return draw(_polygon(h, w))
    mask = draw(_mask(h, w))
    return {"size": [h, w], "counts": _rle_string(mask) if kind == "rle_str" else _runs(mask)}


@st.composite
def _bad_segmentation(draw, h: int, w: int):
    """Segmentations `read_split` must skip as malformed_segmentation."""
    mask = draw(_mask(h, w))
    good_str, good_list = _rle_string(mask), _runs(mask)
    other = _rle_string(np.ones((h + 1, w), np.uint8))  # a valid string of another size
    sizes = [[h + 1, w], [h, w + 1], [w, h] if h != w else [h, 2 * w], [h], [h, w, 1], f"{h}x{w}", [str(h), str(w)],
             [float(h), float(w)], [None, w], [NAN, w], [True, w], None, {"h": h}]
    counts = [5, None, {}, 1.5, [*good_list, 1], [-1, h * w + 1], [float(h * w)], [True, h * w - 1], [[h * w]],
              ["5"], "\u00e9" + good_str, "~~", " ", "o", good_str + "o", other, "\ud800" + good_str]
    polygon = draw(_polygon(h, w))
    far = draw(st.sampled_from([-1e300, 1e300, 3 * w + 5.0, -2 * w - 5.0, 1e9]))
    far_polygon = [[far if k == 0 else v for k, v in enumerate(polygon[0])], *polygon[1:]]
    return draw(st.one_of(
        st.sampled_from([None, 5, "poly", True, 1.5, {}, {"counts": good_str}, {"size": [h, w]}, {"foo": 1}]),
        st.sampled_from(sizes).map(lambda s: {"size": s, "counts": good_str}),
        st.sampled_from(counts).map(lambda c: {"size": [h, w], "counts": c}),
        st.just(far_polygon),
    ))


_NAMES_PREFIX = st.sampled_from(["", "./", "sub/../", "a/b/", "x//"])


@st.composite
def split_cases(draw):
    """(annotations JSON, expected per image, expected per annotation, files {relative path: bytes})."""
    base = draw(st.sampled_from([0, 1, -50, 2**40, 2**62]))
    counter = iter(range(base, base + 10**6, draw(st.integers(1, 3))))
    cat_ids = draw(st.lists(st.integers(0, 12), min_size=1, max_size=4, unique=True))
    categories = [{"id": c, "name": draw(st.text(max_size=5)), "supercategory": "s"}
                  for c in draw(st.permutations(cat_ids))]
    contiguous = {c: k + 1 for k, c in enumerate(sorted(cat_ids))}

    images, img_exp, files = [], [], {}
    kept, claimed = [], {}  # kept: (id, h, w, file_name); claimed: image id -> kept?
    kinds = draw(st.lists(st.sampled_from(["valid"] * 3 + ["malformed", "unsafe", "duplicate"]), min_size=1,
                          max_size=6))
    if "valid" not in kinds:
        kinds.insert(draw(st.integers(0, len(kinds))), "valid")
    for k, kind in enumerate(kinds):
        h, w = draw(st.sampled_from(SIZES))
        if kind == "duplicate" and not claimed:
            kind = "valid"
        image_id = draw(st.sampled_from(sorted(claimed))) if kind == "duplicate" else next(counter)
        img = {"id": image_id, "file_name": f"{kind}{k}.png", "height": h, "width": w,
               **draw(st.sampled_from([{}, {"license": 3, "coco_url": "http://x/y.jpg", "date_captured": None}]))}
        exp = {"slug": None, "defect": None}
        if kind == "valid":
            name = draw(_NAMES_PREFIX) + draw(_SEGMENT) + f"/{k}.png"
            img["file_name"] = name = ("d/" + name) if re.match(r"^[A-Za-z]:", name) else name  # drives: by design
            exp["defect"] = draw(st.sampled_from([None] * 4 + ["missing_image", "empty_image_file", "corrupt_image",
                                                               "size_mismatch"]))
            payload = {None: _image_bytes(h, w), "missing_image": None, "empty_image_file": b"",
                       "corrupt_image": _image_bytes(h, w)[:40], "size_mismatch": _image_bytes(h + 1, w)}
            if payload[exp["defect"]] is not None:
                files[posixpath.normpath(name)] = payload[exp["defect"]]
            kept.append((image_id, h, w, name))
        elif kind == "unsafe":
            img["file_name"] = draw(st.sampled_from(UNSAFE_NAMES) | _SEGMENT.map(lambda s: "../" + s)
                                    | _SEGMENT.map(lambda s: "/" + s))
            exp["slug"] = "unsafe_path"
        elif kind == "duplicate":
            exp["slug"] = "duplicate_image_id"
        else:
            exp["slug"] = "malformed_image"
            how = draw(st.sampled_from(["replace", "drop", "id", "file_name", "height", "width"]))
            if how == "replace":
                img = draw(st.sampled_from([None, 3, "img", [1, 2], True]))
            elif how == "drop":
                del img[draw(st.sampled_from(["id", "file_name", "height", "width"]))]
            elif how == "id":
                img["id"] = draw(st.sampled_from([str(image_id), float(image_id), True, None, [image_id], INT64]))
            elif how == "file_name":
                img["file_name"] = draw(st.sampled_from([3, None, ["a.png"], {"a": 1}, True]))
            else:
                img[how] = draw(st.sampled_from([0, -5, 12.0, "12", True, False, None, NAN, 2**21, 10**30]))
        if isinstance(img, dict) and _proper_id(img.get("id")) and img["id"] not in claimed:
            claimed[img["id"]] = kind == "valid"
        images.append(img)
        img_exp.append(exp)

    annotations, ann_exp, ann_ids = [], [], []
    skipped_ids = [i for i, ok in claimed.items() if not ok]
    for kind in draw(st.lists(st.sampled_from(
            ["valid"] * 4 + ["clipped", "poly_repair", "area_repair", "malformed", "duplicate", "missing_image",
                             "skipped_image", "unknown_category", "degenerate", "bad_segmentation", "zero_area",
                             "outside"]), max_size=8)):
        image_id, h, w, name = draw(st.sampled_from(kept))
        x, y = draw(_quarters(0, w - 1)), draw(_quarters(0, h - 1))
        bbox = [x, y, draw(_quarters(0.25, w - x)), draw(_quarters(0.25, h - y))]
        ann = {"id": next(counter), "image_id": image_id, "category_id": draw(st.sampled_from(cat_ids)),
               "bbox": bbox, "segmentation": draw(_valid_segmentation(h, w))}
        iscrowd = draw(st.sampled_from(["absent", 0, 1, True, False, 0.0, 1.0]))
        area = draw(st.sampled_from(["absent", None, 60.0, 7, 0.5, 0]))
        for key, value in (("iscrowd", iscrowd), ("area", area)):
            if value != "absent":
                ann[key] = value
        exp = {"slug": None, "repairs": [], "bbox": [float(v) for v in bbox], "file": name, "h": h, "w": w}
        if kind == "duplicate" and ann_ids:
            ann["id"] = draw(st.sampled_from(ann_ids))
            exp["slug"] = "duplicate_annotation_id"
        elif kind in ("missing_image", "skipped_image"):
            ann["image_id"] = draw(st.sampled_from(skipped_ids)) if kind == "skipped_image" and skipped_ids \
                else next(counter)
            exp["slug"] = "skipped_image" if ann["image_id"] in claimed else "missing_image_record"
            exp["file"] = None
        elif kind == "unknown_category":
            c = cat_ids[0]
            ann["category_id"] = draw(st.sampled_from([100 + c, str(c), float(c), True, False, None, [c], {"id": c}]))
            exp["slug"] = "unknown_category"
        elif kind == "degenerate":
            ann["segmentation"] = draw(st.lists(_bad_part(h, w), max_size=3))
            exp["slug"] = "degenerate_polygon"
        elif kind == "poly_repair":
            good, bad = draw(_polygon(h, w)), draw(st.lists(_bad_part(h, w), min_size=1, max_size=2))
            order = draw(st.permutations([*[("g", p) for p in good], *[("b", p) for p in bad]]))
            ann["segmentation"] = [p for _, p in order]
            exp["repairs"], exp["seg"] = ["degenerate_polygon"], [p for tag, p in order if tag == "g"]
        elif kind == "bad_segmentation":
            ann["segmentation"] = draw(_bad_segmentation(h, w))
            if draw(st.booleans()):
                del ann["segmentation"]
            exp["slug"] = "malformed_segmentation"
        elif kind == "zero_area":
            ann["bbox"][draw(st.sampled_from([2, 3]))] = draw(st.sampled_from([0, 0.0, -0.0, -1, -0.25, -1e300]))
            exp["slug"] = "zero_area_box"
        elif kind == "outside":
            side = draw(st.integers(0, 3))
            gap, axis = draw(_quarters(0, 5)), side % 2
            ann["bbox"][axis] = ((w, h)[axis] + gap) if side < 2 else -(ann["bbox"][axis + 2] + gap)
            exp["slug"] = "box_outside_image"
        elif kind == "clipped":
            if draw(st.booleans()):
                ann["bbox"], exp["bbox"] = [0, 0, 1e308, 1e308], [0.0, 0.0, float(w), float(h)]
            else:
                x1, y1 = draw(_quarters(-5, w - 0.25)), draw(_quarters(-5, h - 0.25))
                x2, y2 = draw(_quarters(max(x1, 0) + 0.25, w + 5)), draw(_quarters(max(y1, 0) + 0.25, h + 5))
                if x1 >= 0 and y1 >= 0 and x2 <= w and y2 <= h:
                    x2 = w + 1.0
                ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
                exp["bbox"] = [max(x1, 0.0), max(y1, 0.0), min(x2, w) - max(x1, 0.0), min(y2, h) - max(y1, 0.0)]
            exp["repairs"] = ["bbox_clipped"]
        elif kind == "area_repair":
            ann["area"] = draw(st.sampled_from(BAD_AREAS))
            exp["repairs"] = ["area_recomputed"]
        elif kind == "malformed":
            exp["slug"] = "malformed_annotation"
            how = draw(st.sampled_from(["replace", "drop", "id", "image_id", "bbox", "iscrowd"]))
            if how == "replace":
                ann = draw(st.sampled_from([None, 3, "ann", [1], True]))
            elif how == "drop":
                del ann[draw(st.sampled_from(["id", "image_id", "category_id", "bbox"]))]
            elif how == "id":
                ann["id"] = draw(st.sampled_from(["7", 7.0, True, None, [7], INT64]))
            elif how == "image_id":
                ann["image_id"] = draw(st.sampled_from([str(image_id), float(image_id), True, None, [image_id]]))
            elif how == "bbox":
                ann["bbox"] = draw(st.sampled_from(BAD_BBOXES))
            else:
                ann["iscrowd"] = draw(st.sampled_from(BAD_ISCROWD))
        if draw(st.booleans()) and isinstance(ann, dict):
            ann["attributes"] = {"occluded": draw(st.booleans())}  # extra keys are allowed
        if isinstance(ann, dict):
            if not _proper_id(ann.get("image_id")):  # the report names a file only for a well-formed image id
                exp["file"] = None
            if _proper_id(ann.get("id")):
                ann_ids.append(ann["id"])
        else:
            exp["file"] = None
        exp["contiguous"] = None if exp["slug"] else contiguous[ann["category_id"]]
        annotations.append(ann)
        ann_exp.append(exp)

    data = {"info": {"description": "fuzz"}, "images": images, "categories": categories}
    if annotations or draw(st.booleans()):  # no "annotations" key: an image-info-only file (by design)
        data["annotations"] = annotations
    return data, img_exp, ann_exp, files


# ---------------------------------------------------------------------------------------------- properties


def _write_split(tmp: str, data, files: dict[str, bytes] | None = None) -> tuple[str, str]:
    ann_path, root = os.path.join(tmp, "instances.json"), os.path.join(tmp, "images")
    with open(ann_path, "w") as f:
        f.write(json.dumps(data))
    for rel, payload in (files or {}).items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(payload)
    return ann_path, root


@settings(max_examples=150, **FUZZ)
@given(case=split_cases())
def test_generated_files_keep_valid_records_and_report_each_broken_one(case, maker):
    """Every broken record reported once with its slug and ids, every valid one kept as documented, and every
    kept record made into a row (or one report naming its image file's problem), never an exception."""
    data, img_exp, ann_exp, files = case
    with tempfile.TemporaryDirectory() as tmp:
        ann_path, root = _write_split(tmp, data, files)
        loaded = json.loads(json.dumps(data))  # values as read_split sees them (NaN, -0.0, big ints survive)
        source = read_split(ann_path, root)

        expected, kept_images, defects = Counter(), {}, {}
        for img, exp in zip(loaded["images"], img_exp, strict=True):
            if exp["slug"]:
                raw = img if isinstance(img, dict) else {}
                expected[_key(exp["slug"], "skipped", raw.get("id"), None, raw.get("file_name"))] += 1
            else:
                kept_images[img["id"]] = {"image_id": img["id"], "file_name": img["file_name"],
                                          "path": f"{root}/{posixpath.normpath(img['file_name'])}",
                                          "height": img["height"], "width": img["width"], "annotations": []}
                defects[img["id"]] = exp["defect"]
        for ann, exp in zip(loaded.get("annotations", []), ann_exp, strict=True):
            raw = ann if isinstance(ann, dict) else {}
            ids = (raw.get("image_id"), raw.get("id"), exp["file"])
            if exp["slug"]:
                expected[_key(exp["slug"], "skipped", *ids)] += 1
                continue
            for slug in exp["repairs"]:
                expected[_key(slug, "repaired", *ids)] += 1
            seg = exp.get("seg", ann["segmentation"])
            area = ann.get("area")
            if not (type(area) in (int, float) and _finite(area) and area >= 0):  # NaN, inf, bools...: recomputed
                area = _area(seg, exp["h"], exp["w"])
            kept_images[ann["image_id"]]["annotations"].append({
                "id": ann["id"], "category_id": exp["contiguous"], "bbox": exp["bbox"], "segmentation": seg,
                "iscrowd": int(ann.get("iscrowd", 0)), "area": float(area)})

        got = Counter(_key(_slug(s), s["action"], s["image_id"], s["annotation_id"], s["file"])
                      for s in source.skipped)
        assert got == expected
        assert source.records == list(kept_images.values())
        assert sorted(source.coco.anns) == sorted(a["id"] for r in source.records for a in r["annotations"])
        assert source.num_images_total == len(loaded["images"])

        for record in source.records:
            row, reports = maker.make(record)
            if defects[record["image_id"]]:
                assert row is None and [_slug(r) for r in reports] == [defects[record["image_id"]]]
                continue
            assert reports == [], reports  # pycocotools takes every segmentation read_split kept
            instances = [a for a in record["annotations"] if not a["iscrowd"]]
            assert row["num_instances"] == len(instances) and row["num_crowd"] == len(record["annotations"]) - \
                len(instances)
            assert row["gt_class_ids"].tolist() == [a["category_id"] for a in instances]
            for name in ("gt_boxes", "crowd_boxes", "rpn_pos_deltas"):
                assert np.isfinite(row[name]).all(), name
        texts = [json.dumps(r) for r in source.records]
        table = maker({"split": np.array(["x"] * len(texts), dtype=object), "record": np.array(texts, dtype=object)})
        assert table.num_rows == len(texts)
        assert table.column("_ok").to_pylist() == [not defects[r["image_id"]] for r in source.records]
        assert "processing_error" not in "".join(table.column("_reports").to_pylist())


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6),
                     st.sampled_from([0, 1, INT64, 10**400, -0.0, NAN, INF, -INF, "\ud800", "../x"]))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4),
                                                                                          inner, max_size=4),
                     max_leaves=8)
_RLE_CHARS = "".join(chr(c) for c in range(48, 112))  # the characters of pycocotools' compressed RLE strings
CHAOS_SIZES = ((5, 6), (5, 6), (6, 6))  # few sizes: RLE sizes and counts often fit the image they land on


@st.composite
def _near_rle(draw):
    """An RLE that fits one of CHAOS_SIZES, then maybe spoiled: one character of a compressed string replaced,
    dropped or added, or one run of an uncompressed list changed."""
    h, w = draw(st.sampled_from(CHAOS_SIZES))
    mask = np.asfortranarray(draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w)), np.uint8).reshape(
        (h, w), order="F")
    if draw(st.booleans()):
        counts = list(_rle_string(mask))
        if counts and draw(st.integers(0, 2)) == 0:
            k = draw(st.integers(0, len(counts) - 1))
            counts[k: k + 1] = draw(st.sampled_from(["", *_RLE_CHARS[::7], "o0", "\x7f"]))
        return {"size": [h, w], "counts": "".join(counts)}
    runs = _runs(mask)
    if draw(st.integers(0, 2)) == 0:
        runs[draw(st.integers(0, len(runs) - 1))] += draw(st.sampled_from([-1, 1, 0.5]))
    return {"size": [h, w], "counts": runs}


_SEGMENTATIONS = st.one_of(
    _JSON,
    st.lists(st.lists(st.floats(-2, 8), min_size=6, max_size=10), min_size=1, max_size=2),
    st.lists(st.lists(st.floats(-50, 100) | _SCALARS, max_size=8), max_size=3),
    _near_rle(),
    st.fixed_dictionaries({"size": st.lists(st.integers(0, 40) | _SCALARS, max_size=3),
                           "counts": st.text(_RLE_CHARS, max_size=10) | st.lists(st.integers(-2, 400), max_size=6)
                           | _JSON}),
)
_CHAOS_IDS = st.integers(0, 3)  # few ids: repeats and dangling references are common


@st.composite
def _spoiled(draw, well_formed, keys: list[str]):
    """A record from `well_formed` with 0-2 of its fields dropped or replaced by any JSON value; or any JSON."""
    if draw(st.integers(0, 5)) == 5:
        return draw(_JSON)
    record = draw(well_formed)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()):
            record.pop(key, None)
        else:
            record[key] = draw(_JSON | st.sampled_from(UNSAFE_NAMES) | st.integers(-1, 7))
    return record


_CHAOS_IMAGE = _spoiled(st.builds(
    lambda i, n, hw: {"id": i, "file_name": n, "height": hw[0], "width": hw[1]}, _CHAOS_IDS,
    st.sampled_from(["a.png", "b/c.png", "./d.png"]), st.sampled_from(CHAOS_SIZES)), ["id", "file_name", "height",
                                                                                       "width"])
_CHAOS_ANNOTATION = _spoiled(st.fixed_dictionaries(
    {"id": st.integers(0, 11), "image_id": _CHAOS_IDS, "category_id": st.sampled_from([1, 2]),
     "bbox": st.lists(st.floats(-1, 6), min_size=4, max_size=4)
     | st.tuples(_quarters(0, 3), _quarters(0, 3), _quarters(0.25, 1), _quarters(0.25, 1)).map(list),
     "segmentation": st.one_of(_near_rle(), _near_rle(), _SEGMENTATIONS)},
    optional={"iscrowd": st.sampled_from([0, 1]), "area": st.floats(-1, 40)}),
    ["id", "image_id", "category_id", "bbox", "segmentation", "iscrowd", "area"])


@settings(max_examples=200, **FUZZ)
@given(images=st.lists(_CHAOS_IMAGE, min_size=1, max_size=6), annotations=st.lists(_CHAOS_ANNOTATION, max_size=8))
def test_arbitrary_records_never_raise_and_are_all_accounted_for(images, annotations, maker):
    """Any JSON values as image and annotation records: no exception, each record kept or reported (image-level
    slugs for images), reasons documented, repairs only of kept annotations, and what is kept is what the model
    can use: masks pycocotools decodes at the image's size, finite boxes inside the image, unique ids."""
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1}, {"id": 2, "name": "two"}]}
    with tempfile.TemporaryDirectory() as tmp:
        ann_path, root = _write_split(tmp, data)
        source = read_split(ann_path, root)
        for s in source.skipped:
            assert set(s) == {"image_id", "file", "annotation_id", "reason", "action"}
            assert f"`{_slug(s)}`" in coco.__doc__ and s["reason"].startswith(_slug(s) + ": ")
            assert s["action"] == "skipped" or (s["action"] == "repaired" and _slug(s) in REPAIR_SLUGS)
        skipped = [s for s in source.skipped if s["action"] == "skipped"]
        image_level = sum(_slug(s) in IMAGE_SLUGS for s in skipped)
        assert len(source.records) + image_level == len(images)
        assert source.num_annotations + len(skipped) - image_level == len(annotations)
        assert len({r["image_id"] for r in source.records}) == len(source.records)
        ann_ids = [a["id"] for r in source.records for a in r["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids) and sorted(source.coco.anns) == sorted(ann_ids)
        assert all(s["annotation_id"] in ann_ids for s in source.skipped if s["action"] == "repaired")
        for r in source.records:
            h, w = r["height"], r["width"]
            assert _proper_id(r["image_id"]) and type(h) is int and type(w) is int and h > 0 and w > 0
            assert r["path"].startswith(root + "/") and ".." not in r["path"][len(root):].split("/")
            r["path"].encode("utf-8")
            for a in r["annotations"]:
                x, y, bw, bh = a["bbox"]
                assert all(math.isfinite(v) for v in a["bbox"]) and bw > 0 and bh > 0
                assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h
                assert a["iscrowd"] in (0, 1) and a["category_id"] in (1, 2) and _finite(a["area"]) and a["area"] >= 0
                mask = annotation_mask(a, h, w)
                assert mask.shape == (h, w)
                if isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], str):
                    assert mask.sum() == mask_utils.area(a["segmentation"])  # pycocotools read what we checked
            row, reports = maker.make(r)  # no image files here: every record is reported missing, none raises
            assert row is None and [_slug(x) for x in reports] == ["missing_image"]


_CATEGORY_ERRORS = st.one_of(_JSON.filter(lambda v: not isinstance(v, dict)), st.just({"name": "no id"}),
                             _JSON.filter(lambda v: type(v) is not int).map(lambda v: {"id": v}), st.just({"id": 1}))
_UNUSABLE = st.one_of(
    st.binary(max_size=40),
    _JSON.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.tuples(st.sampled_from(["images", "categories", "annotations"]), _JSON.filter(lambda v: not isinstance(
        v, list))).map(lambda t: json.dumps({"images": [], "categories": [], t[0]: t[1]}).encode()),
    st.tuples(st.integers(0, 1), _CATEGORY_ERRORS).map(lambda t: json.dumps(
        {"images": [], "categories": [{"id": 1}, {"id": 3}][: t[0] + 1] + [t[1]]}).encode()),
    st.integers(2_000, 100_000).map(lambda n: ('{"images": ' + "[" * n + "]" * n + ', "categories": []}').encode()),
    st.integers(1, 60).map(lambda k: json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 2,
                                                             "width": 2}], "categories": [{"id": 1}]})[:k].encode()),
    st.just(b'{"images": [], "categories": [], "x": "\xff"}'),
    st.integers(4_301, 6_000).map(lambda n: ('{"images": [], "categories": [], "x": ' + "9" * n + "}").encode()),
)


@settings(max_examples=100, **FUZZ)
@given(raw=_UNUSABLE)
def test_unusable_files_raise_dataset_error_naming_the_file(raw):
    """Bytes that are not JSON, a top level that is not an object with "images" and "categories" lists, a
    broken category (the class map cannot be built without every one), nesting too deep to parse: DatasetError
    with the file's name, never another exception."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "instances.json")
        with open(path, "wb") as f:
            f.write(raw)
        with pytest.raises(DatasetError) as info:
            read_split(path, tmp)
        assert path in str(info.value)


@settings(max_examples=200, **FUZZ)
@given(hw=st.tuples(st.integers(1, 9), st.integers(1, 9)), data=st.data())
def test_compressed_rle_check_agrees_with_pycocotools(hw, data):
    """`read_split`'s own reading of compressed RLE strings gives pycocotools' runs for every string pycocotools
    writes, and for a spoiled string it accepts (runs >= 0 covering the image) pycocotools decodes that mask."""
    h, w = hw
    mask = data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w).map(
        lambda v: np.asarray(v, np.uint8).reshape((h, w), order="F")))
    text = _rle_string(mask)
    assert coco_checks.rle_string_counts(text) == _runs(mask)
    k = data.draw(st.integers(0, len(text)))
    spoiled = text[:k] + data.draw(st.text(_RLE_CHARS + "~ \u00e9", max_size=2)) + text[k + data.draw(
        st.integers(0, 2)):]
    runs = coco_checks.rle_string_counts(spoiled)
    if runs is not None and min(runs, default=0) >= 0 and sum(runs) == h * w:
        flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(np.uint8)
        np.testing.assert_array_equal(mask_utils.decode({"size": [h, w], "counts": spoiled}),
                                      flat.reshape((h, w), order="F"))

"""Records that broke `read_split` or `RowMaker.make` before the fixes they guard, one plain test each.

Found by the property tests of test_fuzz_records.py (or by reading the code they pointed at): an exception out of
`read_split` (OverflowError, ValueError, TypeError, UnicodeEncodeError, RecursionError, KeyError), or a broken
record kept silently, to fail later in pycocotools' C reader, the shards' Arrow columns or the evaluation
index. Each test failed on the code before the fix.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest

from mrcnn.config import shapes
from pipelines.data.coco import read_split
from pipelines.data.errors import DatasetError
from pipelines.data.rows import RowMaker

NAN, INF = float("nan"), float("inf")
INT64 = 2**63
SQUARE = [2.0, 3.0, 12.0, 3.0, 12.0, 9.0, 2.0, 9.0]  # 60 px of a 20 x 20 image
GOOD_RLE = "[16>00000000000000000m4"  # the same square, compressed
IMAGE = {"id": 1, "file_name": "a.png", "height": 20, "width": 20}


def _ann(**fields) -> dict:
    return {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 6], "segmentation": [SQUARE],
            "area": 60.0, "iscrowd": 0, **fields}


def _slug(report: dict) -> str:
    return report["reason"].split(":", 1)[0]


def _read(tmp_path, images, annotations, categories=({"id": 1},)):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return read_split(path, os.path.join(tmp_path, "images"))


def _no_area(**fields) -> dict:
    ann = _ann(**fields)
    del ann["area"]  # read_split computes it with pycocotools: the path that raised or overflowed
    return ann


# (id, images, annotations, the reports' (slug, action) in order, the kept annotation ids)
REGRESSIONS = [
    ("bbox_huge_int", [IMAGE], [_ann(bbox=[10**400, 0, 1, 1])], [("malformed_annotation", "skipped")], []),
    ("polygon_huge_int", [IMAGE], [_ann(segmentation=[[10**400, 0, 1, 1, 2, 2]])],
     [("degenerate_polygon", "skipped")], []),
    ("area_huge_int", [IMAGE], [_ann(area=10**400)], [("area_recomputed", "repaired")], [10]),
    ("rle_size_str", [IMAGE], [_no_area(segmentation={"size": ["a", "b"], "counts": GOOD_RLE})],
     [("malformed_segmentation", "skipped")], []),
    ("rle_size_null", [IMAGE], [_no_area(segmentation={"size": [None, 20], "counts": GOOD_RLE})],
     [("malformed_segmentation", "skipped")], []),
    ("rle_size_nan", [IMAGE], [_no_area(segmentation={"size": [NAN, 20], "counts": GOOD_RLE})],
     [("malformed_segmentation", "skipped")], []),
    ("rle_size_fraction", [IMAGE], [_ann(segmentation={"size": [20.5, 20], "counts": GOOD_RLE})],
     [("malformed_segmentation", "skipped")], []),
    ("rle_string_not_ascii", [IMAGE], [_no_area(segmentation={"size": [20, 20], "counts": "\u00e9\u00e9"})],
     [("malformed_segmentation", "skipped")], []),
    ("rle_string_surrogate", [IMAGE], [_no_area(segmentation={"size": [20, 20], "counts": "\ud800"})],
     [("malformed_segmentation", "skipped")], []),
    ("rle_string_truncated", [IMAGE], [_ann(segmentation={"size": [20, 20], "counts": GOOD_RLE + "o"})],
     [("malformed_segmentation", "skipped")], []),
    ("rle_string_other_size", [IMAGE], [_ann(segmentation={"size": [20, 20], "counts": "]16?00000000000000000U5"})],
     [("malformed_segmentation", "skipped")], []),  # a 21 x 20 mask: pycocotools would decode past the buffer
    ("polygon_far_outside", [IMAGE], [_ann(segmentation=[[2, 3, 1e6, 3, 12, 9]])],
     [("malformed_segmentation", "skipped")], []),  # 1e300 there made pycocotools exhaust the memory
    ("image_too_large", [{**IMAGE, "height": 10**12, "width": 10**12}], [_no_area()],
     [("malformed_image", "skipped"), ("skipped_image", "skipped")], []),
    ("image_id_bool", [{**IMAGE, "id": True}], [], [("malformed_image", "skipped")], []),
    ("image_height_bool", [{**IMAGE, "height": True}], [], [("malformed_image", "skipped")], []),
    ("image_id_beyond_int64", [{**IMAGE, "id": INT64}], [], [("malformed_image", "skipped")], []),
    ("file_name_lone_surrogate", [{**IMAGE, "file_name": "\ud800.png"}], [], [("unsafe_path", "skipped")], []),
    ("annotation_ids_bool", [IMAGE], [_ann(id=True), _ann(id=11, image_id=True)],
     [("malformed_annotation", "skipped")] * 2, []),
    ("category_id_bool", [IMAGE], [_ann(category_id=True)], [("unknown_category", "skipped")], []),
    ("duplicate_annotation_id", [IMAGE], [_ann(), _ann(bbox=[1, 1, 4, 4])], [("duplicate_annotation_id", "skipped")],
     [10]),
    ("annotation_of_malformed_image", [{"id": 1, "file_name": "a.png"}], [_ann()],
     [("malformed_image", "skipped"), ("skipped_image", "skipped")], []),
    ("duplicate_of_skipped_image", [{**IMAGE, "file_name": "../a.png"}, IMAGE], [_ann()],
     [("unsafe_path", "skipped"), ("duplicate_image_id", "skipped"), ("skipped_image", "skipped")], []),
    ("iscrowd_two", [IMAGE], [_ann(iscrowd=2)], [("malformed_annotation", "skipped")], []),
    ("iscrowd_string", [IMAGE], [_ann(iscrowd="1")], [("malformed_annotation", "skipped")], []),
    ("area_nan", [IMAGE], [_ann(area=NAN)], [("area_recomputed", "repaired")], [10]),
    ("area_negative", [IMAGE], [_ann(area=-3.0)], [("area_recomputed", "repaired")], [10]),
    ("repair_of_a_skipped_annotation", [IMAGE], [_ann(segmentation=[SQUARE, [1, 2]], bbox=[2, 3, 0, 6])],
     [("zero_area_box", "skipped")], []),  # was reported "repaired" (degenerate_polygon) AND skipped
]


@pytest.mark.parametrize("images, annotations, reports, kept",
                         [pytest.param(*case[1:], id=case[0]) for case in REGRESSIONS])
def test_records_that_broke_the_old_code(tmp_path, images, annotations, reports, kept):
    """Each record the fuzzing (or reading the code it pointed at) found: now reported with its slug."""
    source = _read(tmp_path, images, annotations)
    assert [(_slug(s), s["action"]) for s in source.skipped] == reports
    assert [a["id"] for r in source.records for a in r["annotations"]] == kept
    for r in source.records:
        for a in r["annotations"]:
            assert a["area"] == 60.0  # recomputed: the square's 60 pixels


@pytest.mark.parametrize("categories", [[{"id": 1}, None], [{"name": "no id"}], [{"id": "x"}], [{"id": INF}],
                                        [{"id": 1}, {"id": False}], [{"id": 1}, {"id": 1.0}]])
def test_malformed_categories_raise_dataset_error(tmp_path, categories):
    """Old code: KeyError, TypeError, ValueError, OverflowError out of CategoryMap, or a bool taken as id 0."""
    with pytest.raises(DatasetError, match="instances.json.*malformed category"):
        _read(tmp_path, [IMAGE], [], categories)


@pytest.mark.parametrize("text", ['{"images": ' + "[" * 5000 + "]" * 5000 + ', "categories": []}',
                                  '{"images": [], "categories": [], "n": ' + "9" * 5000 + "}"])
def test_unparsable_json_raises_dataset_error(tmp_path, text):
    """Old code: RecursionError, and ValueError for an integer of more than 4300 digits."""
    path = tmp_path / "instances.json"
    path.write_text(text)
    with pytest.raises(DatasetError, match="instances.json"):
        read_split(path, tmp_path)


def test_decompression_bomb_is_a_report_not_an_exception(tmp_path):
    """A PNG header claiming 20000 x 20000 pixels: PIL's DecompressionBombError (not an OSError) escaped
    `load_image_rgb` and `RowMaker.make`. Found reading the code the fuzzing pointed at, not by the fuzzer."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))  # 8-bit RGB
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                                        + chunk(b"IEND", b""))
    record = {"image_id": 1, "file_name": "bomb.png", "path": str(tmp_path / "bomb.png"), "height": 20000,
              "width": 20000, "annotations": []}
    row, reports = RowMaker(shapes().to_dict(), torch_threads=None).make(record)
    assert row is None and [_slug(r) for r in reports] == ["oversized_image"]

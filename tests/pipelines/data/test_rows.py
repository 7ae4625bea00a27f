"""pipelines/data/rows.py: what RowMaker stores as the image (schema v2), in-process, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn.config import shapes
from mrcnn.geometry import resize_geometry, resize_image
from mrcnn.mini_masks import unpack_masks
from pipelines.data.coco import load_image_rgb
from pipelines.data.errors import ImageError
from pipelines.data.images import decode_image
from pipelines.data.rows import _WORK_SCHEMA, RowMaker, _image_error_reason, encode_image
from pipelines.data.shards import MAX_CROWD, SHARD_SCHEMA, decode_row


def _record(path, height: int, width: int) -> dict:
    return {"image_id": 7, "file_name": path.name, "path": str(path), "height": height, "width": width,
            "annotations": [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 100.0, "bbox": [4.0, 5.0, 10.0, 10.0],
                             "segmentation": [[4, 5, 14, 5, 14, 15, 4, 15]]}]}


def _photo(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([xx * 4 % 256, yy * 5 % 256, (xx + yy) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _photo_file(tmp_path, name: str = "a.jpg", **save) -> Path:
    """`_photo(40, 60)` saved as a JPEG (PIL's `save` options) at tmp_path / name."""
    path = tmp_path / name
    Image.fromarray(_photo(40, 60)).save(path, "JPEG", **save)
    return path


def test_a_jpeg_is_stored_byte_for_byte_and_resized_when_read(tmp_path):
    path = _photo_file(tmp_path, quality=90)
    config = shapes()
    row, reports = RowMaker(config.to_dict(), torch_threads=None).make(_record(path, 40, 60))
    assert reports == []
    assert row["image"] == path.read_bytes()  # the file itself, not a resized re-encoding
    geo = resize_geometry(40, 60, min_dim=config.image.min_dim, max_dim=config.image.max_dim)
    assert row["window"] == [0, 0, geo.new_w, geo.new_h] and row["scale"] == np.float32(geo.scale)
    image = decode_row(row)["image"]  # [h, w, 3] at the window's size
    original = torch.from_numpy(load_image_rgb(path)).permute(2, 0, 1).contiguous()
    assert np.array_equal(image, resize_image(original, geo.new_h, geo.new_w).permute(1, 2, 0).numpy())


def test_a_cmyk_jpeg_is_re_encoded_at_its_own_size(tmp_path):
    """The loader does not convert CMYK as PIL does: the pixels preprocess saw are stored instead (PNG: exact)."""
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(_photo(30, 20)).convert("CMYK").save(path, "JPEG")
    row, _ = RowMaker(shapes().override(["image.encoding=png"]).to_dict(), torch_threads=None).make(
        _record(path, 30, 20))
    assert row["image"] != path.read_bytes()
    stored = decode_image(row["image"])
    assert stored.shape == (3, 30, 20)  # the original size: not resized in preprocess
    assert np.array_equal(stored.permute(1, 2, 0).numpy(), load_image_rgb(path))
    assert decode_row(row)["image"].shape == (128, 85, 3)  # 128 / 30 = 4.27: 20 -> 85 at the window


def test_a_truncated_file_is_still_skipped_and_named(tmp_path):
    path = _photo_file(tmp_path, "cut.jpg")
    path.write_bytes(path.read_bytes()[:300])
    row, reports = RowMaker(shapes().to_dict(), torch_threads=None).make(_record(path, 40, 60))
    assert row is None and reports[0]["reason"].startswith("corrupt_image") and reports[0]["file"] == "cut.jpg"


def test_every_setting_the_row_maker_reads_reaches_the_row(tmp_path):
    """Each image / roi / mask / rpn setting RowMaker reads, set away from the base, changes the row as it should."""
    path = tmp_path / "cmyk.jpg"  # CMYK: re-encoded, so the encoding settings apply
    Image.fromarray(_photo(40, 60)).convert("CMYK").save(path, "JPEG")
    record = _record(path, 40, 60)
    small = {"id": 2, "category_id": 2, "iscrowd": 0, "area": 36.0, "bbox": [30.0, 20.0, 6.0, 6.0],
             "segmentation": [[30, 20, 36, 20, 36, 26, 30, 26]]}
    record["annotations"].append(small)  # the larger first (area 100), then this one

    def row(*overrides):
        config = shapes().override(["image.min_dim=128", "image.max_dim=128", "roi.max_gt_instances=10",
                                    "mask.mini_mask_size=56", "image.encoding=jpeg", "image.jpeg_quality=95",
                                    "rpn.positive_iou=0.7", *overrides])
        made, reports = RowMaker(config.to_dict(), torch_threads=None).make(record)
        assert reports == []
        return made

    base = row()
    assert base["window"] == [0, 0, 128, 85] and base["num_instances"] == 2 and base["_dropped"] == 0
    assert base["image"][:2] == b"\xff\xd8" and len(base["mini_masks"]) == 2 * 56 * 56 // 8
    # the resize: 64 px (the pipeline keeps max_dim a multiple of 64)
    assert row("image.min_dim=64", "image.max_dim=64")["window"] == [0, 0, 64, 43]
    assert row("image.min_dim=32")["window"] == [0, 0, 48, 32]  # the short side to min_dim: scale 0.8
    # the larger instance kept when only one may be
    one = row("roi.max_gt_instances=1")
    assert one["num_instances"] == 1 and one["_dropped"] == 1 and one["gt_class_ids"].tolist() == [1]
    assert len(row("mask.mini_mask_size=24")["mini_masks"]) == 2 * 24 * 24 // 8
    assert row("image.encoding=png")["image"][:8] == b"\x89PNG\r\n\x1a\n"
    assert len(row("image.jpeg_quality=20")["image"]) < len(base["image"])
    # the RPN labelling: a lower positive IoU makes more positives
    assert len(row("rpn.positive_iou=0.3")["rpn_pos_idx"]) > len(base["rpn_pos_idx"])


def test_the_map_batches_entry_writes_each_record_as_a_row_or_a_reported_skip(tmp_path):
    """RowMaker(batch): a Ray Data batch of JSON records -> one work-table row each, in order, called in-process.

    A good image's row is make()'s row column by column (numpy as lists); a missing file and a record make() raises
    on are rows with only image_id / file_name, `_ok` false and the reason in `_reports`; the split, the instances
    over roi.max_gt_instances and the crowds past what a batch holds are counted per row.
    """
    path = _photo_file(tmp_path)
    good = _record(path, 40, 60)
    good["annotations"].append({"id": 2, "category_id": 2, "iscrowd": 0, "area": 36.0, "bbox": [30.0, 20.0, 6.0, 6.0],
                                "segmentation": [[30, 20, 36, 20, 36, 26, 30, 26]]})
    good["annotations"] += [{"id": 10 + i, "category_id": 1, "iscrowd": 1, "area": 4.0, "bbox": [1.0, 1.0, 2.0, 2.0],
                             "segmentation": {"size": [40, 60], "counts": [41, 2, 38, 2, 2317]}}
                            for i in range(MAX_CROWD + 2)]
    missing = {**_record(tmp_path / "gone.jpg", 40, 60), "image_id": 8}
    broken = {key: value for key, value in _record(path, 40, 60).items() if key != "annotations"}
    broken["image_id"] = 9
    maker = RowMaker(shapes().override(["roi.max_gt_instances=1"]).to_dict(), torch_threads=None)
    records = [good, missing, broken]
    table = maker({"split": np.array(["train", "val", "train"], dtype=object),
                   "record": np.array([json.dumps(r) for r in records], dtype=object)})

    assert table.schema == _WORK_SCHEMA
    out = table.to_pylist()
    assert [r["image_id"] for r in out] == [7, 8, 9]
    assert [r["file_name"] for r in out] == ["a.jpg", "gone.jpg", "a.jpg"]
    assert [r["_split"] for r in out] == ["train", "val", "train"]
    assert [r["_ok"] for r in out] == [True, False, False]
    assert [r["_dropped"] for r in out] == [1, 0, 0]
    assert [r["_crowd_dropped"] for r in out] == [2, 0, 0]
    row, reports = maker.make(good)
    assert json.loads(out[0]["_reports"]) == reports == []
    for name in SHARD_SCHEMA.names:
        want = row[name].tolist() if isinstance(row[name], np.ndarray) else row[name]
        assert out[0][name] == want, name  # float32 values read back as the same Python floats
    assert out[0]["num_crowd"] == MAX_CROWD + 2 and out[0]["num_instances"] == 1
    for r in out[1:]:
        assert all(r[name] is None for name in SHARD_SCHEMA.names if name not in ("image_id", "file_name")), r
    (gone,) = json.loads(out[1]["_reports"])
    assert gone == {"image_id": 8, "file": "gone.jpg", "annotation_id": None, "action": "skipped",
                    "reason": gone["reason"]} and gone["reason"].startswith("missing_image: image file not found")
    (error,) = json.loads(out[2]["_reports"])
    assert error == {"image_id": 9, "file": "a.jpg", "annotation_id": None, "action": "skipped",
                     "reason": "processing_error: KeyError: 'annotations'"}


def test_each_way_an_image_file_fails_is_its_own_reason(tmp_path):
    """The report's reason starts with a slug per cause (what a preprocess summary counts), then read_image's
    message naming the file; a cause without a slug of its own is `bad_image`."""
    jpeg = _photo_file(tmp_path, "whole.jpg").read_bytes()
    files = {"gone.jpg": None, "empty.jpg": b"", "text.jpg": b"not an image at all",
             "cut.jpg": jpeg[: len(jpeg) // 2], "n" * 300 + ".jpg": None}  # a name too long to open: ENAMETOOLONG
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    maker = RowMaker(shapes().to_dict(), torch_threads=None)
    reasons = {}
    for name in files:
        row, (report,) = maker.make(_record(tmp_path / name, 40, 60))
        assert row is None and report["file"] == name and report["action"] == "skipped"
        reasons[name[:8]] = report["reason"]
    assert reasons["gone.jpg"] == f"missing_image: image file not found: {tmp_path / 'gone.jpg'}"
    assert reasons["empty.jp"] == f"empty_image_file: empty image file (0 bytes): {tmp_path / 'empty.jpg'}"
    assert reasons["text.jpg"] == f"corrupt_image: not a recognised image file: {tmp_path / 'text.jpg'}"
    assert reasons["cut.jpg"].startswith(f"corrupt_image: truncated or corrupt image file {tmp_path / 'cut.jpg'}: ")
    assert reasons["nnnnnnnn"].startswith("unreadable_image: cannot read image file ") and "name too long" in \
        reasons["nnnnnnnn"]
    assert _image_error_reason(ImageError("the disk caught fire")) == "bad_image: the disk caught fire"


def test_encode_image_defaults_to_jpeg_at_95_and_refuses_other_encodings():
    pixels = _photo(30, 20)
    assert encode_image(pixels) == encode_image(pixels, encoding="jpeg", quality=95) != encode_image(
        pixels, encoding="jpeg", quality=96)
    assert encode_image(pixels)[:2] == b"\xff\xd8"
    with pytest.raises(ValueError, match=r"^image.encoding must be 'jpeg' or 'png', got 'webp'$"):
        encode_image(pixels, encoding="webp")


def test_a_rows_arrays_have_the_shard_dtypes_flat_and_its_mini_masks_show_the_instances(tmp_path):
    """make()'s row as the shard stores it: int32 / float32 arrays, boxes flattened ([G, 4] -> 4G); the mini-masks
    cut from the original-resolution mask over the box mapped back by the scale (two filled squares: filled); an
    image without instances; an annotation pycocotools cannot decode reported with its id, the rest kept; a file
    whose size is not the record's skipped, both sizes named."""
    path = _photo_file(tmp_path)
    record = _record(path, 40, 60)
    record["annotations"] += [
        {"id": 2, "category_id": 3, "iscrowd": 0, "area": 144.0, "bbox": [30.0, 20.0, 12.0, 12.0],
         "segmentation": [[30, 20, 42, 20, 42, 32, 30, 32]]},
        {"id": 3, "category_id": 1, "iscrowd": 0, "area": 9.0, "bbox": [1.0, 1.0, 3.0, 3.0],
         "segmentation": {"size": [40, 60], "counts": "!!!"}},
        {"id": 4, "category_id": 1, "iscrowd": 1, "area": 4.0, "bbox": [50.0, 2.0, 2.0, 2.0],
         "segmentation": {"size": [40, 60], "counts": [2042, 2, 38, 2, 316]}},
    ]
    maker = RowMaker(shapes().override(["image.min_dim=128", "image.max_dim=128"]).to_dict(), torch_threads=None)
    row, reports = maker.make(record)
    assert reports == [{"image_id": 7, "file": "a.jpg", "annotation_id": 3, "action": "skipped",
                        "reason": "malformed_segmentation: ValueError: Invalid RLE mask representation"}]
    scale = 128 / 60
    assert row["scale"] == float(np.float32(scale)) and row["num_instances"] == 2 and row["num_crowd"] == 1
    assert row["_dropped"] == 0 and row["_crowd_dropped"] == 0  # one crowd: within what a batch holds
    want = {"gt_class_ids": (np.int32, (2,)), "gt_boxes": (np.float32, (8,)), "crowd_boxes": (np.float32, (4,)),
            "rpn_pos_idx": (np.int32, None), "rpn_pos_deltas": (np.float32, None), "rpn_ignore_idx": (np.int32, None)}
    for name, (dtype, shape) in want.items():
        assert row[name].dtype == dtype and row[name].ndim == 1, name
        assert shape is None or row[name].shape == shape, name
    assert row["gt_class_ids"].tolist() == [1, 3]
    assert row["rpn_pos_deltas"].shape == (4 * len(row["rpn_pos_idx"]),) and len(row["rpn_pos_idx"]) > 0
    assert np.array_equal(row["gt_boxes"], (np.array([4, 5, 14, 15, 30, 20, 42, 32], np.float32)
                                            * np.float32(scale)))
    mini = unpack_masks(row["mini_masks"], 2, 56)
    assert mini.mean(axis=(1, 2)).min() > 0.9  # each square fills its box (a box read at the wrong place: empty)

    empty = maker.make({**record, "annotations": [record["annotations"][3]]})[0]
    assert empty["num_instances"] == 0 and empty["mini_masks"] == b""
    assert empty["gt_class_ids"].dtype == np.int32 and empty["gt_class_ids"].shape == (0,)
    assert empty["gt_boxes"].dtype == np.float32 and empty["gt_boxes"].shape == (0,)

    row, reports = maker.make({**record, "height": 41})
    assert row is None and reports == [{"image_id": 7, "file": "a.jpg", "annotation_id": None, "action": "skipped",
                                        "reason": "size_mismatch: file is 60x40 (w x h), annotations say 60x41"}]


def test_a_row_maker_sets_one_torch_thread_by_default():
    """One Ray Data actor per CPU: its torch runs one intra-op thread unless told otherwise (None leaves it)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        RowMaker(shapes().to_dict(), torch_threads=None)
        assert torch.get_num_threads() == 2
        RowMaker(shapes().to_dict())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_over_max_gt_instances_the_largest_are_kept_ties_by_their_order(tmp_path):
    """59 instances of areas 1, 2 or 3 and room for 23: the 23 largest, ties taken in the file's order (the kept
    ones in that order too). An unstable argsort keeps other ties on this very list (found by search)."""
    path = _photo_file(tmp_path)
    areas = [3, 3, 2, 3, 3, 3, 2, 3, 1, 2, 3, 3, 2, 2, 1, 2, 2, 3, 3, 1, 3, 2, 2, 3, 2, 1, 1, 3, 2, 2, 2, 3, 2, 1, 3,
             1, 1, 3, 2, 1, 1, 2, 3, 2, 3, 1, 1, 3, 3, 1, 1, 3, 2, 2, 1, 3, 2, 3, 3]
    record = {**_record(path, 40, 60), "annotations": [
        {"id": i + 1, "category_id": 1, "iscrowd": 0, "area": float(a), "bbox": [float(i), 0.0, 1.0, 1.0],
         "segmentation": [[i, 0, i + 1, 0, i + 1, 1, i, 1]]} for i, a in enumerate(areas)]}
    maker = RowMaker(shapes().override(["image.min_dim=40", "image.max_dim=64", "roi.max_gt_instances=23"]).to_dict(),
                     torch_threads=None)
    row, _ = maker.make(record)
    largest = sorted(range(len(areas)), key=lambda i: -areas[i])[:23]  # Python's sort is stable
    assert row["scale"] == 1.0 and row["_dropped"] == len(areas) - 23
    assert row["gt_boxes"].reshape(-1, 4)[:, 0].astype(int).tolist() == sorted(largest)

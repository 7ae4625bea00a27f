"""pipelines/data/coco.py: split paths, safe joins, the category map, record checks, masks and pixels."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipelines.data.categories import CategoryMap
from pipelines.data.coco import annotation_mask, load_image_rgb, read_split, safe_image_path, split_paths
from pipelines.data.errors import DatasetError, ImageError, UnsafePathError
from pipelines.data.synth import make_synthetic_dataset

SQUARE = [2.0, 3.0, 12.0, 3.0, 12.0, 9.0, 2.0, 9.0]  # pixels x 2..11, y 3..8: 60 px


# ---------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("/data/coco", ("/data/coco/annotations/instances_val2017.json", "/data/coco/val2017")),
        ("/data/coco/", ("/data/coco/annotations/instances_val2017.json", "/data/coco/val2017")),
        ("s3://bucket/coco", ("s3://bucket/coco/annotations/instances_val2017.json", "s3://bucket/coco/val2017")),
        ("gs://b/c/", ("gs://b/c/annotations/instances_val2017.json", "gs://b/c/val2017")),
    ],
)
def test_split_paths(dataset, expected):
    assert split_paths(dataset, "val2017") == expected


@pytest.mark.parametrize("name", ["../x.jpg", "/etc/passwd", "a/../../b.jpg", "..", "", ".", "a\\..\\b.jpg",
                                  "C:x.jpg", "s3://other/x.jpg", "x\x00.jpg"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(UnsafePathError, match="unsafe image file name"):
        safe_image_path("/data/images", name)
    assert issubclass(UnsafePathError, DatasetError)


@pytest.mark.parametrize(
    "root, name, expected",
    [
        ("/data/images", "x.jpg", "/data/images/x.jpg"),
        ("/data/images/", "a/b/c.jpg", "/data/images/a/b/c.jpg"),
        ("/data/images", "a/../b.jpg", "/data/images/b.jpg"),
        ("/data/images", "./a//x.jpg", "/data/images/a/x.jpg"),
        ("s3://bucket/images/", "sub/x.jpg", "s3://bucket/images/sub/x.jpg"),
        ("images", "x..y.jpg", "images/x..y.jpg"),
    ],
)
def test_safe_names_are_joined(root, name, expected):
    assert safe_image_path(root, name) == expected


# ---------------------------------------------------------------------------------------------- categories


def test_category_map_known_answer_and_round_trip():
    cats = CategoryMap.from_coco([{"id": 7, "name": "triangle", "supercategory": "shape"},
                                  {"id": 1, "name": "circle", "supercategory": "shape"},
                                  {"id": 3, "name": "square", "supercategory": "shape"}])
    assert cats.coco_ids == (1, 3, 7) and cats.names == ("circle", "square", "triangle")
    assert [cats.to_contiguous(c) for c in (1, 3, 7)] == [1, 2, 3]
    assert [cats.to_coco(k) for k in (1, 2, 3)] == [1, 3, 7]
    assert cats.num_classes == 4
    assert cats.name(0) == "background" and cats.name(3) == "triangle"
    for bad in (0, 4):
        with pytest.raises(KeyError):
            cats.to_coco(bad)
    with pytest.raises(KeyError, match="unknown COCO category id 2"):
        cats.to_contiguous(2)
    again = CategoryMap.from_dict(json.loads(json.dumps(cats.to_dict())))
    assert again == cats and again.to_contiguous(7) == 3
    with pytest.raises(DatasetError, match="duplicate"):
        CategoryMap.from_coco([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])


# ---------------------------------------------------------------------------------------------- read_split


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _ann(ann_id, image_id, category_id=5, bbox=(2, 3, 10, 6), segmentation=None, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
            "segmentation": [SQUARE] if segmentation is None else segmentation, "area": 60.0, "iscrowd": 0,
            **extra}


def test_each_bad_record_is_reported_and_good_ones_survive(tmp_path):
    crowd = np.zeros((80, 100), dtype=np.uint8)
    crowd[10:20, 30:50] = 1
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(crowd.ravel(order="F"))) + 1, [crowd.size]]))
    crowd_rle = {"size": [80, 100], "counts": [int(r) for r in runs]}
    data = {
        "categories": [{"id": 5, "name": "five"}, {"id": 1, "name": "one"}],
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": 80, "width": 100},
            {"id": 2, "file_name": "sub/b.jpg", "height": 80, "width": 100},
            {"id": 1, "file_name": "dup.jpg", "height": 80, "width": 100},
            {"id": 3, "file_name": "../evil.jpg", "height": 80, "width": 100},
            {"id": 4, "file_name": "/etc/passwd", "height": 80, "width": 100},
            {"id": 5, "file_name": "c.jpg", "height": 50, "width": 60},
            {"id": 6, "file_name": "d.jpg"},
        ],
        "annotations": [
            _ann(10, 1),
            _ann(11, 99),
            _ann(12, 1, category_id=42),
            _ann(13, 1, segmentation=[[1, 2, 3, 4]]),
            _ann(14, 1, segmentation=[SQUARE, [1, 2]]),
            _ann(15, 1, bbox=(5, 5, 0, 4)),
            _ann(16, 1, bbox=(90, 70, 20, 20)),
            _ann(17, 1, bbox=(200, 10, 5, 5)),
            _ann(18, 3),
            _ann(19, 2, category_id=1, bbox=(30, 10, 20, 10), segmentation=crowd_rle, iscrowd=1, area=200.0),
            _ann(20, 2, segmentation={"size": [10, 10], "counts": "PPYo0"}),
            _ann(21, 2, bbox="abc"),
        ],
    }
    path = _write(tmp_path / "instances_x.json", data)
    source = read_split(path, tmp_path / "x")

    assert [r["image_id"] for r in source.records] == [1, 2, 5]
    first, second, third = source.records
    assert first["file_name"] == "a.jpg" and first["path"] == f"{tmp_path}/x/a.jpg"  # duplicate: first kept
    assert second["path"] == f"{tmp_path}/x/sub/b.jpg"
    assert (third["height"], third["width"], third["annotations"]) == (50, 60, [])
    assert [a["id"] for a in first["annotations"]] == [10, 14, 16]
    assert all(a["category_id"] == 2 for a in first["annotations"])  # COCO id 5 -> contiguous 2
    assert first["annotations"][0] == {"id": 10, "category_id": 2, "bbox": [2.0, 3.0, 10.0, 6.0],
                                       "segmentation": [SQUARE], "iscrowd": 0, "area": 60.0}
    assert first["annotations"][1]["segmentation"] == [SQUARE]  # the 1-point part dropped
    assert first["annotations"][2]["bbox"] == [90.0, 70.0, 10.0, 10.0]  # clipped to 100 x 80
    (crowd_ann,) = second["annotations"]
    assert (crowd_ann["id"], crowd_ann["category_id"], crowd_ann["iscrowd"]) == (19, 1, 1)

    got = {(s["image_id"], s["annotation_id"]): (s["reason"].split(":")[0], s["action"]) for s in source.skipped}
    assert got == {
        (1, None): ("duplicate_image_id", "skipped"),
        (3, None): ("unsafe_path", "skipped"),
        (4, None): ("unsafe_path", "skipped"),
        (6, None): ("malformed_image", "skipped"),
        (99, 11): ("missing_image_record", "skipped"),
        (1, 12): ("unknown_category", "skipped"),
        (1, 13): ("degenerate_polygon", "skipped"),
        (1, 14): ("degenerate_polygon", "repaired"),
        (1, 15): ("zero_area_box", "skipped"),
        (1, 16): ("bbox_clipped", "repaired"),
        (1, 17): ("box_outside_image", "skipped"),
        (3, 18): ("skipped_image", "skipped"),
        (2, 20): ("malformed_segmentation", "skipped"),
        (2, 21): ("malformed_annotation", "skipped"),
    }
    dup = next(s for s in source.skipped if s["reason"].startswith("duplicate_image_id"))
    assert dup["file"] == "dup.jpg" and "'a.jpg'" in dup["reason"]
    assert all(set(s) == {"image_id", "file", "annotation_id", "reason", "action"} for s in source.skipped)
    assert source.num_images_total == 7 and source.num_annotations_total == 12 and source.num_annotations == 4
    assert source.annotations_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source.categories.coco_ids == (1, 5)
    # The pycocotools index holds exactly the kept annotations, with their original category ids.
    assert sorted(source.coco.anns) == [10, 14, 16, 19]
    assert source.coco.anns[19]["category_id"] == 1 and source.coco.anns[10]["category_id"] == 5
    np.testing.assert_array_equal(annotation_mask(crowd_ann, 80, 100), crowd)


def test_missing_or_malformed_annotations_name_the_file(tmp_path):
    missing = tmp_path / "nope" / "instances_train2017.json"
    for target in (missing, f"file://{missing}"):
        with pytest.raises(DatasetError, match="annotations file not found: .*nope/instances_train2017.json"):
            read_split(target, tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DatasetError, match=f"malformed JSON in annotations file {broken}"):
        read_split(broken, tmp_path)
    for bad, why in (([], "expected a JSON object"), ({"categories": []}, "'images'")):
        path = _write(tmp_path / "bad.json", bad)
        with pytest.raises(DatasetError, match=why) as info:
            read_split(path, tmp_path)
        assert str(path) in str(info.value)


def test_synthetic_split_reads_cleanly_and_masks_match_pycocotools(tmp_path):
    result = make_synthetic_dataset(tmp_path, train=12, val=0, seed=5)
    ann_path, images_root = split_paths(tmp_path, "train2017")
    assert (ann_path, images_root) == (result["train"]["annotations"], result["train"]["images_dir"])
    source = read_split(ann_path, images_root)
    assert source.skipped == [] and len(source.records) == 12 == source.num_images_total
    assert source.categories.coco_ids == (1, 3, 7) and source.categories.num_classes == 4
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO(ann_path)
    kinds = set()
    for record in source.records:
        assert Path(record["path"]).is_file()
        pixels = load_image_rgb(record["path"])
        assert pixels.shape == (record["height"], record["width"], 3) and pixels.dtype == np.uint8
        for ann in record["annotations"]:
            original = reference.anns[ann["id"]]
            assert source.categories.to_coco(ann["category_id"]) == original["category_id"]
            assert (ann["bbox"], ann["area"], ann["iscrowd"]) == (original["bbox"], original["area"],
                                                                   original["iscrowd"])
            seg = ann["segmentation"]
            kinds.add("polygon" if isinstance(seg, list) else type(seg["counts"]).__name__)
            np.testing.assert_array_equal(annotation_mask(ann, record["height"], record["width"]),
                                          reference.annToMask(original))
    assert kinds == {"polygon", "str", "list"}


def test_annotation_mask_known_answers():
    expected = np.zeros((20, 20), dtype=np.uint8)
    expected[3:9, 2:12] = 1
    np.testing.assert_array_equal(annotation_mask({"segmentation": [SQUARE]}, 20, 20), expected)
    compressed = mask_utils.encode(np.asfortranarray(expected))
    compressed["counts"] = compressed["counts"].decode()  # as json.load gives it
    np.testing.assert_array_equal(annotation_mask({"segmentation": compressed}, 20, 20), expected)
    # Column-major runs from zero: columns (0,1,0) and (1,1,0).
    uncompressed = {"size": [3, 2], "counts": [1, 1, 1, 2, 1]}
    np.testing.assert_array_equal(annotation_mask({"segmentation": uncompressed}, 3, 2), [[0, 1], [1, 1], [0, 0]])


# ---------------------------------------------------------------------------------------------- pixels


def _gradient(h=24, w=32) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 8, yy * 10, np.full_like(xx, 128)], axis=2).astype(np.uint8)


def test_load_image_rgb_converts_modes(tmp_path):
    rgb = _gradient()
    gray = Image.fromarray(rgb).convert("L")
    gray.save(tmp_path / "gray.jpg", quality=95)
    out = load_image_rgb(tmp_path / "gray.jpg")
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.abs(out[..., 0].astype(int) - np.asarray(gray, dtype=int)).max() <= 4

    # CMYK JPEG (COCO has a few): pure cyan, magenta, yellow and white quadrants.
    cmyk = np.zeros((16, 16, 4), dtype=np.uint8)
    cmyk[:8, :8, 0] = cmyk[:8, 8:, 1] = cmyk[8:, :8, 2] = 255
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    out = load_image_rgb(tmp_path / "cmyk.jpg")
    assert out.shape == (16, 16, 3)
    for (r, c), colour in {(2, 2): (0, 255, 255), (2, 12): (255, 0, 255), (12, 2): (255, 255, 0),
                           (12, 12): (255, 255, 255)}.items():
        assert np.abs(out[r, c].astype(int) - colour).max() <= 12, ((r, c), out[r, c])

    rgba = np.dstack([rgb, np.linspace(0, 255, 32, dtype=np.uint8)[None, :].repeat(24, axis=0)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image_rgb(tmp_path / "rgba.png"), rgb)  # alpha dropped, colour kept

    palette = Image.fromarray(rgb).quantize(colors=16)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(load_image_rgb(tmp_path / "palette.png"), np.asarray(palette.convert("RGB")))

    deep = Image.fromarray(np.arange(6, dtype=np.uint16).reshape(2, 3) * 13107)  # mode I;16, 0..65535
    deep.save(tmp_path / "deep.png")
    np.testing.assert_array_equal(load_image_rgb(tmp_path / "deep.png")[..., 0], [[0, 51, 102], [153, 204, 255]])

    # Through pyarrow.fs for URIs.
    np.testing.assert_array_equal(load_image_rgb(f"file://{tmp_path}/rgba.png"), rgb)


def test_load_image_rgb_names_bad_files(tmp_path):
    Image.fromarray(_gradient(64, 64)).save(tmp_path / "good.jpg", quality=95)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg" * 10)
    cases = {
        "missing.jpg": "image file not found",
        "empty.jpg": r"empty image file \(0 bytes\)",
        "cut.jpg": "truncated or corrupt image file",
        "junk.jpg": "not a recognised image file",
    }
    for name, why in cases.items():
        with pytest.raises(ImageError, match=why) as info:
            load_image_rgb(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    with pytest.raises(ImageError, match="image file not found"):
        load_image_rgb(f"file://{tmp_path}/missing.jpg")
    assert load_image_rgb(tmp_path / "good.jpg").shape == (64, 64, 3)


# ---------------------------------------------------------------------------------------------- real COCO


def test_coco128_reads_with_zero_skips(shared_data):
    root = shared_data / "coco128"
    if not root.is_dir():
        pytest.skip("../shared/data/coco128 is absent")
    ann_path, images_root = split_paths(root, "train2017")
    source = read_split(ann_path, images_root)
    assert source.skipped == []
    assert len(source.records) == source.num_images_total == 128
    assert source.num_annotations == source.num_annotations_total == 939
    assert len(source.categories.coco_ids) == 80 and source.categories.num_classes == 81
    assert source.categories.coco_ids[-1] == 90 and source.categories.name(1) == "person"
    assert [r["image_id"] for r in source.records if not r["annotations"]] == [250, 508]
    anns = [a for r in source.records for a in r["annotations"]]
    assert sum(isinstance(a["segmentation"], list) for a in anns) == 929
    crowd = [a for a in anns if a["iscrowd"]]
    assert len(crowd) == 10 and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    assert len({a["category_id"] for a in anns}) == 71
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO(ann_path)
    for record in source.records[:16]:
        for ann in record["annotations"]:
            np.testing.assert_array_equal(annotation_mask(ann, record["height"], record["width"]),
                                          reference.annToMask(reference.anns[ann["id"]]))
    gray = next(r for r in source.records if r["file_name"] == "000000000086.jpg")
    pixels = load_image_rgb(gray["path"])
    assert pixels.shape == (gray["height"], gray["width"], 3)
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_read_image_without_pixels_still_reads_the_whole_jpeg(tmp_path):
    """pixels=False (what preprocess asks for) decodes a kept JPEG at 1/8 scale: the size is the file's, and a
    truncated or corrupt file fails as a full decode does; files to re-encode still come with their pixels."""
    from pipelines.data.coco import read_image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))
    rgb.save(tmp_path / "a.jpg", quality=90)
    got = read_image(tmp_path / "a.jpg", pixels=False)
    assert got.pixels is None and got.loader_reads and (got.height, got.width) == (45, 70)
    assert got.data == (tmp_path / "a.jpg").read_bytes()
    raw = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) - 200])
    broken = bytearray(raw)
    broken[len(raw) // 2 : len(raw) // 2 + 600] = b"\xff" * 600  # markers where entropy-coded data should be
    (tmp_path / "bad.jpg").write_bytes(bytes(broken))
    for name in ("cut.jpg", "bad.jpg"):
        with pytest.raises(ImageError, match="truncated or corrupt"):
            read_image(tmp_path / name)
        with pytest.raises(ImageError, match="truncated or corrupt"):
            read_image(tmp_path / name, pixels=False)
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    cmyk = read_image(tmp_path / "cmyk.jpg", pixels=False)
    assert not cmyk.loader_reads and cmyk.pixels.shape == (45, 70, 3)

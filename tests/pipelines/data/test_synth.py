"""pipelines/data/synth.py: the synthetic COCO dataset, checked through pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipelines.data.synth import _uncompressed_rle, make_synthetic_dataset, render_image

TRAIN, VAL = 40, 10


def _coco(path: str | Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), train=TRAIN, val=VAL, seed=0)


@pytest.fixture(scope="module")
def train_coco(dataset) -> COCO:
    return _coco(dataset["train"]["annotations"])


def _kind(segmentation) -> str:
    if isinstance(segmentation, list):
        return "polygon"
    return "uncompressed" if isinstance(segmentation["counts"], list) else "compressed"


def _eroded(mask: np.ndarray, steps: int = 2) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        inner = out.copy()
        inner[1:] &= out[:-1]
        inner[:-1] &= out[1:]
        inner[:, 1:] &= out[:, :-1]
        inner[:, :-1] &= out[:, 1:]
        out = inner
    return out


def test_layout_and_counts(dataset):
    root = Path(dataset["root"])
    for split, folder, count in (("train", "train2017", TRAIN), ("val", "val2017", VAL)):
        info = dataset[split]
        assert info["annotations"] == str(root / "annotations" / f"instances_{folder}.json")
        assert info["images_dir"] == str(root / folder)
        coco = _coco(info["annotations"])
        assert len(coco.imgs) == count == info["num_images"]
        assert len(coco.anns) == info["num_annotations"] > 0
        assert sum(a["iscrowd"] for a in coco.anns.values()) == info["num_crowd"]
        assert sorted(p.name for p in (root / folder).iterdir()) == sorted(i["file_name"] for i in coco.imgs.values())
        for img in coco.imgs.values():
            with Image.open(root / folder / img["file_name"]) as picture:
                assert picture.format == "JPEG"
                assert picture.size == (img["width"], img["height"])
    train_ids = set(_coco(dataset["train"]["annotations"]).imgs)
    val_ids = set(_coco(dataset["val"]["annotations"]).imgs)
    assert not train_ids & val_ids


def test_categories_are_non_contiguous_and_named(train_coco):
    cats = train_coco.loadCats(train_coco.getCatIds())
    assert [(c["id"], c["name"], c["supercategory"]) for c in cats] == [
        (1, "circle", "shape"), (3, "square", "shape"), (7, "triangle", "shape")]
    used = {a["category_id"] for a in train_coco.anns.values()}
    assert used == {1, 3, 7}


def test_all_three_segmentation_kinds(train_coco):
    kinds = {}
    for ann in train_coco.anns.values():
        kinds.setdefault(_kind(ann["segmentation"]), []).append(ann)
    assert set(kinds) == {"polygon", "compressed", "uncompressed"}
    # Crowd regions are exactly the uncompressed RLEs, as in COCO.
    assert all(a["iscrowd"] == 1 for a in kinds["uncompressed"])
    assert all(a["iscrowd"] == 0 for a in kinds["polygon"] + kinds["compressed"])
    assert all(isinstance(a["segmentation"]["counts"], str) for a in kinds["compressed"])
    # Circles are never polygons; polygons are squares (4 points) or triangles (3 points), one part each.
    for ann in kinds["polygon"]:
        assert len(ann["segmentation"]) == 1
        assert len(ann["segmentation"][0]) == {3: 8, 7: 6}[ann["category_id"]]


def test_varied_sizes_grayscale_and_empty_images(dataset, train_coco):
    sizes = [(img["width"], img["height"]) for img in train_coco.imgs.values()]
    assert all(96 <= w <= 192 and 96 <= h <= 192 for w, h in sizes)
    assert sum(w != h for w, h in sizes) >= TRAIN // 2
    assert len(set(sizes)) >= TRAIN // 2
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    modes = []
    for img in train_coco.imgs.values():
        with Image.open(Path(dataset["train"]["images_dir"]) / img["file_name"]) as picture:
            modes.append(picture.mode)
    assert 2 <= modes.count("L") <= TRAIN // 4
    assert modes.count("RGB") == TRAIN - modes.count("L")
    empty = [i for i in train_coco.imgs if not train_coco.imgToAnns.get(i)]
    assert 2 <= len(empty) <= TRAIN // 4


def test_area_and_bbox_match_the_masks(dataset):
    for split in ("train", "val"):
        coco = _coco(dataset[split]["annotations"])
        for ann in coco.anns.values():
            mask = coco.annToMask(ann)
            rle = mask_utils.encode(np.asfortranarray(mask))
            assert ann["area"] == float(mask.sum()) == float(mask_utils.area(rle)) > 0
            assert ann["bbox"] == [float(v) for v in mask_utils.toBbox(rle)]


def test_masks_reproduce_the_drawn_shapes(dataset, train_coco):
    images_dir = Path(dataset["train"]["images_dir"])
    occluded = 0
    for index, image_id in enumerate(sorted(train_coco.imgs)):
        sample = render_image(0, "train", index)
        anns = train_coco.imgToAnns.get(image_id, [])
        assert len(anns) == len(sample.instances)
        with Image.open(images_dir / train_coco.imgs[image_id]["file_name"]) as picture:
            pixels = np.asarray(picture.convert("RGB"), dtype=np.float64)
        luma = np.array([0.299, 0.587, 0.114])
        claimed = np.zeros(pixels.shape[:2], dtype=int)
        for ann, inst in zip(anns, sample.instances, strict=True):
            assert ann["category_id"] == inst.category_id and ann["iscrowd"] == inst.iscrowd
            np.testing.assert_array_equal(train_coco.annToMask(ann), inst.mask.astype(np.uint8))
            claimed += inst.mask
            if _kind(ann["segmentation"]) == "polygon":
                assert np.array_equal(inst.mask, inst.full_mask)  # polygons only for un-occluded shapes
            occluded += not np.array_equal(inst.mask, inst.full_mask)
            inner = _eroded(inst.mask)
            if inst.iscrowd or inner.sum() < 10:
                continue
            # The JPEG shows the instance's colour where its mask says (grayscale images: its luminance).
            seen = pixels[inner].mean(axis=0)
            if sample.grayscale:
                assert abs(seen[0] - luma @ np.array(inst.colour)) < 8
            else:
                assert np.abs(seen - np.array(inst.colour)).max() < 10, (image_id, seen, inst.colour)
        assert claimed.max(initial=0) <= 1  # visible parts never overlap
    assert occluded >= 3


def test_object_sizes_suit_a_128px_input(train_coco):
    extents = [max(a["bbox"][2:]) for a in train_coco.anns.values() if not a["iscrowd"]]
    assert max(extents) <= 60 * 2**0.5 + 1  # a 60 px square turned 45 degrees
    assert np.median(extents) >= 12


def test_uncompressed_rle_known_answer():
    # Column-major runs starting with zeros: column 0 is 0,1,0 and column 1 is 1,1,0.
    mask = np.array([[0, 1], [1, 1], [0, 0]], dtype=bool)
    assert _uncompressed_rle(mask) == {"size": [3, 2], "counts": [1, 1, 1, 2, 1]}
    assert _uncompressed_rle(np.array([[1], [0]], dtype=bool))["counts"] == [0, 1, 1]
    rle = mask_utils.frPyObjects(_uncompressed_rle(mask), 3, 2)
    np.testing.assert_array_equal(mask_utils.decode(rle), mask.astype(np.uint8))


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_seeds_differ(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_synthetic_dataset(tmp_path / name, train=6, val=3, seed=seed)
    a, b, c = (_all_bytes(tmp_path / n) for n in "abc")
    assert len(a) == 6 + 3 + 2 and a == b
    ann = "annotations/instances_train2017.json"
    assert a[ann] != c[ann]
    assert sum(a[k] != c[k] for k in a) >= 9
    # The JSON is sorted and carries no timestamps: it is the canonical dump of its own content.
    assert a[ann].decode() == json.dumps(json.loads(a[ann]), sort_keys=True)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="counts"):
        make_synthetic_dataset(tmp_path, train=-1, val=0)
    with pytest.raises(ValueError, match="min_size"):
        make_synthetic_dataset(tmp_path, train=1, val=0, min_size=200, max_size=100)


def test_200_images_all_written(tmp_path):
    """The counts asked for are the counts written (no wall-clock bound: timing belongs in bench/)."""
    result = make_synthetic_dataset(tmp_path, train=160, val=40, seed=1)
    assert (result["train"]["num_images"], result["val"]["num_images"]) == (160, 40)
    assert len(list((tmp_path / "train2017").iterdir())) == 160 and len(list((tmp_path / "val2017").iterdir())) == 40

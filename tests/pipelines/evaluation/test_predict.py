"""`predict`: a trained tiny model on plain image files writes COCO results that pycocotools loads and evaluates,
through the same geometry as preprocessing; pictures of a known size; image ids from COCO file names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mrcnn.config import shapes
from pipelines.data.coco import load_image_rgb, read_split, split_paths
from pipelines.data.rows import RowMaker
from pipelines.data.shards import decode_row
from pipelines.evaluation.inference import network_input
from pipelines.evaluation.predict import (
    HEADER_PX,
    MAX_PICTURE_PX,
    find_images,
    image_ids,
    predict_images,
)
from tests.support.trained_shapes import train_tiny_shapes

pytestmark = pytest.mark.usefixtures("one_thread")  # every test here on one torch thread (conftest)


@pytest.fixture(scope="module")
def tiny_model(synth_dataset, tmp_path_factory) -> str:
    return train_tiny_shapes(synth_dataset, tmp_path_factory.mktemp("tiny"))


@pytest.mark.slow  # trains the tiny model first
def test_predict_writes_coco_results_that_pycocotools_loads_and_evaluates(tiny_model, synth_dataset, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotations, images = split_paths(str(synth_dataset), "val2017")
    result = predict_images([images], tiny_model, tmp_path / "out", threshold=0.0)
    gt = COCO(annotations)
    # COCO file names give the image ids, so the results line up with the annotations
    assert sorted(i["id"] for i in result.images) == sorted(gt.getImgIds())
    detections = json.loads(Path(result.predictions).read_text())
    assert len(detections) == result.num_detections > 0  # threshold 0: every image has detections
    sizes = {i["id"]: (i["height"], i["width"]) for i in result.images}
    for d in detections:
        height, width = sizes[d["image_id"]]
        x, y, w, h = d["bbox"]
        assert 0 <= x and 0 <= y and x + w <= width + 0.01 and y + h <= height + 0.01  # original pixels
        assert d["segmentation"]["size"] == [height, width] and isinstance(d["segmentation"]["counts"], str)
        assert d["category_id"] in gt.getCatIds() and 0.0 <= d["score"] <= 1.0
    dt = gt.loadRes(result.predictions)
    assert len(dt.anns) == len(detections)
    for iou_type in ("bbox", "segm"):
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert len(evaluator.stats) == 12 and -1.0 <= evaluator.stats[0] <= 1.0


@pytest.mark.slow
def test_one_picture_per_image_of_the_documented_size(tiny_model, synth_dataset, tmp_path):
    _, images = split_paths(str(synth_dataset), "val2017")
    files = sorted(Path(images).glob("*.jpg"))[:2]
    result = predict_images(files, tiny_model, tmp_path / "out")  # the model's own threshold
    assert len(result.pictures) == 2
    for picture, info in zip(result.pictures, result.images, strict=True):
        zoom = min(4.0, MAX_PICTURE_PX / max(info["height"], info["width"]))
        with Image.open(picture) as im:
            assert im.size == (round(info["width"] * zoom), round(info["height"] * zoom) + HEADER_PX)


def test_network_input_is_the_preprocessed_image(synth_dataset):
    """The same resize as the shard writer: with lossless PNG shards the pixels agree exactly."""
    config = shapes().override(["image.encoding=png"])
    source = read_split(*split_paths(str(synth_dataset), "val2017"))
    record = source.records[1]
    row = decode_row(RowMaker(config.to_dict(), torch_threads=None).make(record)[0])
    canvas, geo = network_input(load_image_rgb(record["path"]), min_dim=128, max_dim=128)
    assert canvas.shape == (3, 128, 128) and canvas.dtype == np.uint8
    assert tuple(geo.window) == tuple(row["window"]) and geo.scale == pytest.approx(row["scale"], rel=1e-6)
    x1, y1, x2, y2 = geo.window
    np.testing.assert_array_equal(canvas[:, y1:y2, x1:x2].transpose(1, 2, 0), row["image"])
    assert not canvas[:, y2:, :].any() and not canvas[:, :, x2:].any()  # zero padding bottom / right


def test_image_ids_from_coco_file_names_else_positions(tmp_path):
    assert image_ids([Path("000000397133.jpg"), Path("a/000000000042.png")]) == [397133, 42]
    assert image_ids([Path("cat.jpg"), Path("000000000042.png")]) == [1, 2]
    assert image_ids([Path("1.jpg"), Path("001.png")]) == [1, 2]  # the same number twice


def test_find_images_takes_files_and_folders(tmp_path):
    for name in ("b.JPG", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jpeg").write_bytes(b"x")
    found = find_images([tmp_path, tmp_path / "sub" / "c.jpeg", tmp_path / "a.png"])
    assert [p.name for p in found] == ["a.png", "b.JPG", "c.jpeg"]  # sorted, no duplicates, no .txt
    with pytest.raises(FileNotFoundError, match="missing"):
        find_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jpg"):
        find_images([tmp_path / "empty"])


def test_a_pictures_mask_pixels_have_the_masks_colour(tmp_path):
    """What the picture shows, not only that it exists: a detection's RLE mask drawn on a grey 40 x 60 image (shown
    4x under the title band) tints exactly its own pixels with the instance's colour."""
    import pycocotools.mask as mask_util

    from pipelines.evaluation.predict import detections_picture
    from pipelines.pictures import overlay_color

    grey = 128
    image = np.full((40, 60, 3), grey, np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 20:45] = 1  # rows 10..29, columns 20..44
    mask[20:30, 20:26] = 0  # a notch: no flip or shift of the mask keeps it where it was
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    result = {"image_id": 1, "category_id": 1, "bbox": [15.0, 5.0, 35.0, 30.0], "score": 0.9, "segmentation": rle}
    png = np.asarray(Image.open(detections_picture(image, [result], {1: "circle"}, tmp_path / "p.png")).convert("RGB"))
    assert png.shape == (HEADER_PX + 160, 240, 3)
    shown = png[HEADER_PX:].astype(int)
    tint = np.rint(grey * 0.55 + np.asarray(overlay_color(0)) * 0.45)
    centres = shown[2::4, 2::4]  # one PNG pixel at the centre of each image pixel (4 x 4 PNG pixels each)
    # clear of the box outline (x 15..50, y 5..35) and of its tag (the top rows inside the box)
    rows, cols = slice(12, 33), slice(17, 48)
    np.testing.assert_array_equal(np.abs(centres[rows, cols] - tint).max(axis=2) <= 1, mask[rows, cols] == 1)
    np.testing.assert_array_equal(np.abs(centres[rows, cols] - grey).max(axis=2) <= 1, mask[rows, cols] == 0)
    assert (np.abs(centres[37:, :10] - grey).max(axis=2) <= 1).all()  # outside the box: the image as it was

"""`inspect`: every stage draws a PNG of the documented size on synthetic shards, with the numbers it prints
agreeing with independent computations; the gt overlay lands inside the masks; anchors print the generator's count."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from mrcnn.anchors import AnchorSettings, anchors_from_config, anchors_per_level
from mrcnn.config import coco, shapes
from mrcnn.geometry import resize_image
from mrcnn.mini_masks import expand_masks, mini_mask_boxes, unpack_masks
from mrcnn.model import build_model
from pipelines.data.categories import CategoryMap
from pipelines.data.shardset import ShardSet, read_manifest
from pipelines.infra.context import RunContext
from pipelines.inspection.command import STAGES, InspectRequest, run_inspect
from pipelines.inspection.data_stages import anchors_picture
from pipelines.inspection.panels import TITLE_PX, panel_px, picture_size
from pipelines.inspection.samples import load_sample
from pipelines.pictures import overlay_color
from pipelines.training.checkpoints import save_checkpoint
from pipelines.training.step import StepRunner

PANEL = 384  # panel_px(128) at the shapes preset: 3 PNG pixels an image pixel


pytestmark = pytest.mark.usefixtures("one_thread")  # every test here on one torch thread (conftest)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """A SQLite store whose experiments keep their artifacts in tmp (MLflow's default is ./mlruns)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    for name in ("mrcnn-pipeline", "t"):
        MlflowClient(uri).create_experiment(name, artifact_location=(root / name).as_uri())
    return uri


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_layout_sizes():
    assert panel_px(128) == PANEL and panel_px(1024) == 400 and panel_px(64) == 384
    assert picture_size(2, 3, PANEL) == (3 * PANEL, TITLE_PX + 2 * (32 + PANEL))


@pytest.mark.slow
def test_every_stage_on_shards_in_one_mlflow_run(synth_shards, tmp_path, tracking_uri):
    out = tmp_path / "all"
    results = run_inspect(InspectRequest(stage="all", out=str(out), shards=synth_shards, split="train2017"),
                          RunContext(tracking_uri=tracking_uri))
    row = pq.read_table(f"{synth_shards}/train2017").slice(0, 1).to_pylist()[0]
    g, p = len(row["gt_class_ids"]), len(row["rpn_pos_idx"])
    config = shapes()
    grids = {"gt": (1, 2), "anchors": (2, 3), "rpn-targets": (1, 2), "mini-masks": (min(g, 6), 3), "deltas": (1, 2),
             "proposals": (1, 2), "detection-targets": (1 + math.ceil(min(4, results["detection-targets"]["positive"])
                                                                      / 3), 3),
             "batch": (1, config.train.batch_size), "predictions": (1, 2)}
    for stage in STAGES:
        assert _png(out / f"{stage}.png").shape[1::-1] == picture_size(*grids[stage], PANEL), stage
    # the numbers printed agree with the row and with the samplers' rules
    rpn = results["rpn-targets"]
    assert rpn["positive"] == p and rpn["ignored"] == len(row["rpn_ignore_idx"])
    assert rpn["positive"] + rpn["negative"] + rpn["ignored"] == len(anchors_from_config(config))
    k = config.rpn.anchors_per_image
    assert rpn["sampled_positive"] == min(p, int(k * config.rpn.positive_fraction))
    assert rpn["sampled_positive"] + rpn["sampled_negative"] == k
    assert results["deltas"]["positives"] == p and results["deltas"]["max_error_px"] < 1e-3
    assert results["mini-masks"]["instances"] == g and min(results["mini-masks"]["ious"]) > 0.9
    targets = results["detection-targets"]
    assert targets["positive"] >= g  # the gt boxes themselves are candidates
    assert targets["positive"] + targets["negative"] == targets["rois"] <= config.roi.rois_per_image
    assert targets["max_error_px"] < 1e-3  # positives + target deltas land on their gt boxes
    assert results["proposals"]["kept"] == min(config.rpn.post_nms_test, results["proposals"]["after_nms"])
    flips = StepRunner(model=None, optimizer=None, scheduler=None, device=torch.device("cpu"), grad_clip=0.0,
                       seed=config.train.seed).flip_choice(0, config.train.batch_size)
    assert results["batch"]["flipped"] == flips.tolist()
    assert "untrained model" in results["predictions"]["title"] and "untrained model" in results["proposals"]["title"]
    artifacts = MlflowClient(tracking_uri).list_artifacts(results["mlflow_run"], "inspect")
    assert {a.path for a in artifacts} == {f"inspect/{stage}.png" for stage in STAGES}


@pytest.mark.parametrize(("config", "expected"), [(coco(), 65_472), (shapes(), 4_092)], ids=["coco", "shapes"])
def test_anchors_picture_prints_the_generators_count(config, expected, tmp_path):
    info = anchors_picture(config, tmp_path / "anchors.png")
    printed = re.search(r"anchors: ([\d,]+) in total, per level ([\d, ]+)", info["title"])
    assert int(printed.group(1).replace(",", "")) == info["total"] == len(anchors_from_config(config)) == expected
    per_level = anchors_per_level(AnchorSettings.from_config(config))
    assert [int(v.replace(",", "")) for v in printed.group(2).split(", ")] == info["per_level"] == per_level
    assert _png(info["path"]).shape[1::-1] == picture_size(2, 3, panel_px(config.image.max_dim))


def _far_pixel(boxes: np.ndarray, window, margin: int) -> tuple[int, int] | None:
    """An (x, y) inside the window, at least `margin` px from every box and 4 px from the window's edge."""
    x1, y1, x2, y2 = (int(v) for v in window)
    free = np.zeros((y2, x2), bool)
    free[y1 + 4 : y2 - 4, x1 + 4 : x2 - 4] = True
    for bx1, by1, bx2, by2 in boxes:
        free[max(int(by1) - margin, 0) : int(by2) + margin, max(int(bx1) - margin, 0) : int(bx2) + margin] = False
    ys, xs = np.nonzero(free)
    return (int(xs[0]), int(ys[0])) if len(xs) else None


def test_gt_overlay_inside_the_masks_and_not_far_from_them(synth_shards, tmp_path, tracking_uri):
    """Read the row independently (pyarrow, PIL, the shared resize, unpack_masks), find a pixel deep inside a gt
    mask and one far from every box, and check the PNG: tinted with the
    instance's overlay colour there, untouched here."""
    rows = pq.read_table(f"{synth_shards}/val2017").to_pylist()
    for row in rows:
        boxes = np.asarray(row["gt_boxes"], np.float32).reshape(-1, 4)
        far = _far_pixel(boxes, row["window"], margin=24)
        if len(boxes) and far:
            break
    else:
        pytest.fail("no validation image with room far from its boxes")
    source = torch.from_numpy(np.array(Image.open(io.BytesIO(row["image"])).convert("RGB"))).permute(2, 0, 1)
    x1, y1, x2, y2 = row["window"]  # v2 rows hold the source image: resized to the window when read
    image = resize_image(source.contiguous(), y2 - y1, x2 - x1).permute(1, 2, 0).numpy()
    canvas = np.zeros((128, 128, 3), np.uint8)
    canvas[: image.shape[0], : image.shape[1]] = image
    g = len(boxes)
    masks = expand_masks(torch.as_tensor(unpack_masks(row["mini_masks"], g, 56)),
                         mini_mask_boxes(torch.as_tensor(boxes)), 128, 128).numpy()
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.get_experiment_by_name("t").experiment_id).info.run_id
    info = run_inspect(InspectRequest(stage="gt", out=str(tmp_path / "gt.png"), shards=synth_shards,
                                      split="val2017", image_id=row["image_id"], mlflow_run=run),
                       RunContext(tracking_uri=tracking_uri))["gt"]
    assert [a.path for a in MlflowClient(tracking_uri).list_artifacts(run, "inspect")] == ["inspect/gt.png"]
    png = _png(info["path"])
    assert png.shape[1::-1] == picture_size(1, 2, PANEL) and info["instances"] == g
    left, top, width, _ = info["image_rect"]
    zoom = width // 128

    def at(x: int, y: int) -> np.ndarray:  # centre of image pixel (x, y) in the PNG
        return png[top + y * zoom + zoom // 2, left + x * zoom + zoom // 2].astype(int)

    # deepest pixel of instance i's mask, alone (no other mask) and below the box's label tag
    i = int(np.argmax(masks.sum((1, 2))))
    alone = masks[i] & ~np.delete(masks, i, axis=0).any(0)
    alone[: int(boxes[i][1]) + 8] = False
    depth = alone.copy()
    while (eroded := depth & np.roll(depth, 1, 0) & np.roll(depth, -1, 0) & np.roll(depth, 1, 1)
           & np.roll(depth, -1, 1)).any():
        depth = eroded
    y, x = (int(v[0]) for v in np.nonzero(depth))
    tint = np.rint(canvas[y, x] * 0.55 + np.asarray(overlay_color(i)) * 0.45)
    assert np.abs(at(x, y) - tint).max() <= 2, (at(x, y), tint, canvas[y, x])
    assert np.abs(at(x, y) - canvas[y, x].astype(int)).max() > 10  # the tint shows
    fx, fy = far
    assert np.abs(at(fx, fy) - canvas[fy, fx].astype(int)).max() <= 2  # no overlay far from the masks


def test_dataset_and_shards_give_the_same_row(synth_dataset, synth_shards):
    """`--dataset` runs the shard writer's RowMaker on the COCO record: the same targets as the shards."""
    image_id = pq.read_table(f"{synth_shards}/val2017").column("image_id")[2].as_py()
    from_shards = load_sample(shards=ShardSet.open(synth_shards), split="val2017", image_id=image_id)
    from_dataset = load_sample(dataset=str(synth_dataset), split="val2017", image_id=image_id, config=shapes())
    for key in ("gt_class_ids", "gt_boxes", "mini_masks", "crowd_boxes", "rpn_pos_idx", "rpn_ignore_idx", "window"):
        np.testing.assert_array_equal(from_shards.row[key], from_dataset.row[key], err_msg=key)
    assert from_shards.categories == from_dataset.categories
    assert from_shards.image_id == from_dataset.image_id == image_id


def test_model_stages_with_a_checkpoint(synth_shards, tmp_path):
    manifest = read_manifest(synth_shards)
    categories = CategoryMap.from_dict(manifest["categories"])
    torch.manual_seed(0)
    model = build_model(shapes(), num_classes=categories.num_classes)
    ckpt = save_checkpoint(tmp_path / "ckpt", model=model, optimizer=None, scheduler=None, step=0, epoch=0,
                           batch_in_epoch=0, meta={"config": shapes().to_dict(), "categories": manifest["categories"],
                                                   "num_classes": categories.num_classes})
    info = run_inspect(InspectRequest(stage="predictions", out=str(tmp_path / "p.png"), shards=synth_shards,
                                      model_path=str(ckpt), threshold=0.0), RunContext())["predictions"]
    assert f"model {ckpt}" in info["title"] and "untrained" not in info["title"]
    # threshold 0: every RoI's best classes pass, up to max_detections
    assert 0 < info["detections"] <= shapes().detection.max_detections
    assert info["scores"] == sorted(info["scores"], reverse=True)


def test_bad_requests_are_refused(synth_dataset, tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        run_inspect(InspectRequest(stage="rpn", out=str(tmp_path / "x.png"), dataset=str(synth_dataset)), RunContext())
    with pytest.raises(ValueError, match="--shards"):
        run_inspect(InspectRequest(stage="batch", out=str(tmp_path / "x.png"), dataset=str(synth_dataset),
                                   config=shapes()), RunContext())
    with pytest.raises(ValueError, match="--shards SHARDS or --dataset"):
        run_inspect(InspectRequest(stage="gt", out=str(tmp_path / "x.png")), RunContext())

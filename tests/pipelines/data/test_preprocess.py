"""pipelines/data/preprocess.py: shards that decode back to a direct computation, bad input reported, atomic output.

The Ray tests share the conftest's local Ray and one small synthetic dataset (12 train / 6 val images at the
`shapes` preset); expected values are computed here independently of the stage: geometry by hand, masks with
pycocotools' own COCO index, RPN labels with torchvision's box_iou and BoxCoder.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from mrcnn.anchors import anchors_from_config
from mrcnn.config import coco as coco_preset
from mrcnn.config import shapes
from mrcnn.mini_masks import expand_masks, mini_mask_boxes
from pipelines.data import preprocess as pp
from pipelines.data.coco import split_paths
from pipelines.data.errors import DatasetError
from pipelines.data.preprocess import OutputExistsError, preprocess
from pipelines.data.rows import RowMaker
from pipelines.data.shards import SHARD_SCHEMA, decode_row
from pipelines.data.shardset import FingerprintMismatch, check_fingerprint, read_manifest
from pipelines.data.synth import make_synthetic_dataset

CONTIGUOUS = {1: 1, 3: 2, 7: 3}  # synth's COCO ids 1, 3, 7 -> 1..3
SPLITS = ("train2017", "val2017")


def _splits(root: Path, names=SPLITS) -> list[tuple[str, str, str]]:
    return [(name, *split_paths(str(root), name)) for name in names]


def _rows(shards: Path, manifest: dict, split: str) -> list[dict]:
    """All rows of a split, sorted by image id (row order across files is not part of the contract)."""
    files = [str(shards / f) for f in manifest["splits"][split]["files"]]
    if not files:
        return []
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return sorted(table.to_pylist(), key=lambda r: r["image_id"])


def _coco(annotations: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(annotations)


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    """A corrupted copy of a synthetic val split (10 images) and what the run must report for it."""
    root = tmp_path_factory.mktemp("bad")
    make_synthetic_dataset(root, train=0, val=10, seed=3)
    return root, _corrupt(root)


@pytest.fixture(scope="module")
def synth_shards(ray_session, synth_dataset, bad_dataset, tmp_path_factory):
    """ONE preprocess run (Ray actors are slow to start) over train2017, val2017 and the corrupted "valbad"."""
    out = tmp_path_factory.mktemp("shards")
    splits = [*_splits(synth_dataset), ("valbad", *split_paths(str(bad_dataset[0]), "val2017"))]
    uri = preprocess(shapes(), splits=splits, out=str(out), progress=False, max_workers=2)
    return out, read_manifest(str(out)), uri


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.slow
def test_manifest_counts_match_the_source(synth_shards, synth_dataset):
    out, manifest, uri = synth_shards
    assert uri == f"{out}/manifest.json"
    assert manifest["schema_version"] == 2 and manifest["fingerprint"] == shapes().fingerprint()
    check_fingerprint(manifest, shapes())
    with pytest.raises(FingerprintMismatch, match="image.max_dim: 128 != 1024"):
        check_fingerprint(manifest, coco_preset())
    assert manifest["categories"]["coco_ids"] == [1, 3, 7]
    assert list(manifest["splits"]) == [*SPLITS, "valbad"]
    for split in SPLITS:
        coco = _coco(split_paths(str(synth_dataset), split)[0])
        m = manifest["splits"][split]
        rows = _rows(out, manifest, split)
        empty = sorted(i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=i, iscrowd=False))
        assert empty, "the synthetic split should hold an image without instances"
        assert m["skipped"] == [] and m["num_images_source"] == len(coco.getImgIds())
        if split == "train2017":  # training split: empty images dropped, but counted
            assert m["empty_images"] == {"kept": 0, "dropped": len(empty), "dropped_ids": empty}
            expected_ids = sorted(set(coco.getImgIds()) - set(empty))
        else:  # evaluation split: kept
            assert m["empty_images"]["kept"] == len(empty) and m["empty_images"]["dropped"] == 0
            expected_ids = sorted(coco.getImgIds())
        assert [r["image_id"] for r in rows] == expected_ids == sorted(expected_ids)
        assert m["num_images"] == len(rows)
        instances = sum(len(coco.getAnnIds(imgIds=i, iscrowd=False)) for i in expected_ids)
        crowd = sum(len(coco.getAnnIds(imgIds=i, iscrowd=True)) for i in expected_ids)
        assert (m["num_instances"], m["num_crowd"]) == (instances, crowd)
        for f in m["files"]:
            assert pq.read_schema(out / f).equals(SHARD_SCHEMA, check_metadata=False)


@pytest.mark.slow
def test_rows_decode_to_a_direct_computation(synth_shards, synth_dataset):
    out, manifest, _ = synth_shards
    config = shapes()
    rpn = config.rpn
    anchors = anchors_from_config(config)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    checked_masks = 0
    for split in SPLITS:
        annotations, images = split_paths(str(synth_dataset), split)
        coco = _coco(annotations)
        for row in _rows(out, manifest, split):
            got = decode_row(row, num_anchors=len(anchors), mini_mask_size=config.mask.mini_mask_size)
            info = coco.imgs[row["image_id"]]
            h, w = info["height"], info["width"]
            scale = 128 / max(h, w)  # min_dim = max_dim = 128: the long side decides
            new_w, new_h = round(w * scale), round(h * scale)
            assert got["scale"] == pytest.approx(scale, rel=1e-6)
            assert got["window"].tolist() == [0, 0, new_w, new_h]
            path = Path(images) / info["file_name"]
            assert row["image"] == path.read_bytes()  # schema v2: the source file's bytes, not re-encoded
            resized = Image.open(path).convert("RGB").resize((new_w, new_h), Image.Resampling.BILINEAR)
            diff = np.abs(got["image"].astype(int) - np.asarray(resized, int))  # resized when read, not stored
            assert got["image"].shape == (new_h, new_w, 3) and diff.max() <= 1  # torch's antialiased bilinear ~ PIL's

            anns = coco.loadAnns(coco.getAnnIds(imgIds=row["image_id"]))
            things = [a for a in anns if not a["iscrowd"]]
            crowd = [a for a in anns if a["iscrowd"]]
            xyxy = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in things)],
                            np.float32).reshape(-1, 4) * scale
            assert got["gt_class_ids"].tolist() == [CONTIGUOUS[a["category_id"]] for a in things]
            np.testing.assert_allclose(got["gt_boxes"], xyxy, rtol=1e-5, atol=1e-4)
            cxyxy = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in crowd)],
                             np.float32).reshape(-1, 4) * scale
            np.testing.assert_allclose(got["crowd_boxes"], cxyxy, rtol=1e-5, atol=1e-4)
            assert row["num_instances"] == len(things) and row["num_crowd"] == len(crowd)

            # Mini-masks pasted back into the padded frame vs pycocotools' mask resized (nearest) to it.
            assert got["mini_masks"].shape == (len(things), 56, 56)
            if things:
                pasted = np.asarray(expand_masks(torch.from_numpy(got["mini_masks"]),
                                                 mini_mask_boxes(torch.from_numpy(got["gt_boxes"])), 128, 128))
                for k, ann in enumerate(things):
                    full = Image.fromarray(coco.annToMask(ann) * 255).resize((new_w, new_h), Image.Resampling.NEAREST)
                    expected = np.zeros((128, 128), bool)
                    expected[:new_h, :new_w] = np.asarray(full) > 127
                    iou = (pasted[k] & expected).sum() / max((pasted[k] | expected).sum(), 1)
                    assert iou > 0.8, (row["image_id"], k, iou)
                    checked_masks += 1

            # RPN labels from a dense computation with torchvision's box_iou / BoxCoder.
            gt = torch.from_numpy(xyxy)
            match = torch.zeros(len(anchors), dtype=torch.int8)
            deltas = torch.zeros(len(anchors), 4)
            positive = torch.zeros(len(anchors), dtype=torch.bool)
            if len(gt):
                iou = box_iou(anchors, gt)  # [A, G]
                best, argmax = iou.max(dim=1)
                positive = (best >= rpn.positive_iou) | (
                    (iou == iou.max(dim=0).values) & (iou.max(dim=0).values > 0)).any(1)
                match[(best >= rpn.negative_iou) & ~positive] = -1
                deltas[positive] = coder.encode_single(gt[argmax[positive]], anchors[positive])
            if len(cxyxy):
                match[(box_iou(anchors, torch.from_numpy(cxyxy)).max(dim=1).values >= rpn.crowd_iou) & ~positive] = -1
            match[positive] = 1
            assert (got["rpn_match"] == match.numpy()).all(), row["image_id"]
            np.testing.assert_allclose(got["rpn_deltas"], deltas.numpy(), atol=1e-4)
            assert len(things) == 0 or (got["rpn_match"] == 1).any()  # every gt box has a positive anchor
    assert checked_masks > 20


# ---------------------------------------------------------------------------------------------- output handling


@pytest.mark.slow
def test_interrupted_overwrite_looks_incomplete_and_a_rerun_gives_identical_rows(
        synth_shards, synth_dataset, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    shutil.copytree(synth_shards[0], out)
    manifest = read_manifest(str(out))
    before = {s: _rows(out, manifest, s) for s in SPLITS}
    with pytest.raises(OutputExistsError, match="overwrite"):
        preprocess(shapes(), splits=_splits(synth_dataset), out=str(out), progress=False)

    def killed(*args, **kwargs):
        raise RuntimeError("killed before the manifest")

    with monkeypatch.context() as m:  # an overwrite that dies after publishing its (here empty) shards
        m.setattr(pp, "_run", lambda *args, **kwargs: {})
        m.setattr(pp, "_manifest", killed)
        with pytest.raises(RuntimeError, match="killed"):
            preprocess(shapes(), splits=_splits(synth_dataset), out=str(out), overwrite=True, progress=False)
    assert (out / "train2017").is_dir() and not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_manifest(str(out))

    preprocess(shapes(), splits=_splits(synth_dataset), out=str(out), progress=False, max_workers=1)  # no overwrite
    again = read_manifest(str(out))
    for split in SPLITS:
        assert _rows(out, again, split) == before[split]  # determinism, compared by image id
    # the old "valbad" split went with the overwrite, and no .tmp-* is left behind
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *SPLITS]


def test_bad_annotations_fail_before_any_work(tmp_path):
    out = tmp_path / "shards"
    with pytest.raises(DatasetError, match="annotations file not found"):
        preprocess(shapes(), splits=[("val2017", str(tmp_path / "nope.json"), str(tmp_path))], out=str(out))
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DatasetError, match="malformed JSON"):
        preprocess(shapes(), splits=[("val2017", str(broken), str(tmp_path))], out=str(out))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- bad input


def _corrupt(root: Path) -> dict:
    """Damage a copy of the synthetic val split in every way the issue lists; returns what to expect."""
    ann_path = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann_path.read_text())
    images = {im["id"]: im for im in data["images"]}
    ids = sorted(images)
    folder = root / "val2017"
    expect = {}  # image id -> reason slug for images that must be skipped
    (folder / images[ids[0]]["file_name"]).unlink()
    expect[ids[0]] = "missing_image"
    jpeg = (folder / images[ids[1]]["file_name"]).read_bytes()
    (folder / images[ids[1]]["file_name"]).write_bytes(jpeg[: len(jpeg) // 2])
    expect[ids[1]] = "corrupt_image"
    (folder / images[ids[2]]["file_name"]).write_bytes(b"")
    expect[ids[2]] = "empty_image_file"
    images[ids[3]]["height"] += 7
    expect[ids[3]] = "size_mismatch"

    # annotation-level damage, on images that stay good (they lose exactly these instances)
    pool = [a for a in data["annotations"] if a["image_id"] in ids[5:] and not a["iscrowd"]]
    poly = next(a for a in pool if isinstance(a["segmentation"], list))
    zero, outside, unknown = [a for a in pool if a is not poly][:3]
    poly["segmentation"] = [poly["segmentation"][0][:4]]  # 2 points
    zero["bbox"][2] = 0.0
    outside["bbox"] = [images[outside["image_id"]]["width"] + 10.0, 5.0, 8.0, 8.0]
    unknown["category_id"] = 99
    cases = [(poly, "degenerate_polygon"), (zero, "zero_area_box"), (outside, "box_outside_image"),
             (unknown, "unknown_category")]
    lost = {}
    for ann, _ in cases:
        lost[ann["image_id"]] = lost.get(ann["image_id"], 0) + 1
    orphan = {**zero, "id": 9_999_999, "image_id": 4_242_424, "bbox": [1.0, 1.0, 5.0, 5.0]}
    data["annotations"].append(orphan)
    cases.append((orphan, "missing_image_record"))
    data["images"].append({**images[ids[5]], "file_name": "other.jpg"})  # duplicate id
    data["images"].append({"id": 900_001, "file_name": "../escape.jpg", "height": 10, "width": 10})
    data["images"].append({"id": 900_002, "file_name": "/etc/passwd", "height": 10, "width": 10})
    ann_path.write_text(json.dumps(data))
    return {"image_skips": expect, "ann_skips": {a["id"]: r for a, r in cases}, "lost": lost, "ids": ids,
            "instances": {i: sum(a["image_id"] == i and not a["iscrowd"] for a in data["annotations"])
                          for i in ids}}


@pytest.mark.slow
def test_every_bad_record_is_reported_and_every_good_one_written(synth_shards, bad_dataset):
    out, manifest, _ = synth_shards
    expect = bad_dataset[1]
    m = manifest["splits"]["valbad"]
    skipped = m["skipped"]
    slug = lambda e: e["reason"].split(":")[0]  # noqa: E731

    image_level = {e["image_id"]: slug(e) for e in skipped if e["annotation_id"] is None}
    for image_id, reason in expect["image_skips"].items():
        assert image_level[image_id] == reason
    assert image_level[900_001] == image_level[900_002] == "unsafe_path"
    assert image_level[expect["ids"][5]] == "duplicate_image_id"
    by_ann = {e["annotation_id"]: slug(e) for e in skipped if e["annotation_id"] is not None}
    for ann_id, reason in expect["ann_skips"].items():
        assert by_ann[ann_id] == reason, (ann_id, by_ann.get(ann_id))
    assert all(e["file"] for e in skipped if e["image_id"] in expect["image_skips"])

    rows = {r["image_id"]: r for r in _rows(out, manifest, "valbad")}
    good = sorted(set(expect["ids"]) - set(expect["image_skips"]))
    assert sorted(rows) == good  # evaluation split: empty images kept, every good image present
    for image_id in good:
        assert rows[image_id]["num_instances"] == expect["instances"][image_id] - expect["lost"].get(image_id, 0)
    assert m["num_images"] == len(good)
    assert m["num_images"] + m["num_skipped_images"] == m["num_images_source"]
    assert m["skip_counts"]["missing_image"] == 1 and m["skip_counts"]["unsafe_path"] == 2


def test_instances_and_crowds_past_the_limits_are_counted_and_said(ray_session, tmp_path, project_log):
    """Images with more instances than roi.max_gt_instances, or more crowd regions than a batch holds, lose the
    rest; never silently: the manifest counts them and the console says so."""
    from pipelines.data.shards import MAX_CROWD

    root = tmp_path / "crowded"
    make_synthetic_dataset(root, train=0, val=3, seed=5)
    annotations, images_root = split_paths(str(root), "val2017")
    data = json.loads(Path(annotations).read_text())
    first = data["images"][0]["id"]
    template = next(a for a in data["annotations"] if a["image_id"] == first and not a["iscrowd"])
    next_id = max(a["id"] for a in data["annotations"]) + 1
    have = sum(a["image_id"] == first and not a["iscrowd"] for a in data["annotations"])
    limit = shapes().roi.max_gt_instances
    extra_instances = limit + 5 - have  # the image then holds limit + 5 instances
    for k in range(extra_instances):
        data["annotations"].append({**template, "id": next_id + k})
    crowd = {**template, "iscrowd": 1, "segmentation": template["segmentation"]}
    for k in range(MAX_CROWD + 4):
        data["annotations"].append({**crowd, "id": next_id + extra_instances + k})
    Path(annotations).write_text(json.dumps(data))

    out = tmp_path / "shards"
    preprocess(shapes(), splits=[("val2017", annotations, images_root)], out=str(out), progress=False,
               max_workers=1)
    m = read_manifest(str(out))["splits"]["val2017"]
    have_crowd = sum(a["image_id"] == first and a["iscrowd"] for a in json.loads(Path(annotations).read_text())[
        "annotations"])
    assert (m["instances_over_limit"], m["images_over_limit"]) == (5, 1)
    assert (m["crowd_over_limit"], m["images_crowd_over_limit"]) == (have_crowd - MAX_CROWD, 1)
    said = " ".join(project_log.messages)
    assert f"1 images have more than roi.max_gt_instances={limit} instances: 5 instances were left out" in said
    assert f"1 images have more than {MAX_CROWD} crowd regions" in said


# ---------------------------------------------------------------------------------------------- without Ray


def test_an_annotation_without_an_id_is_no_skipped_image(tmp_path):
    """num_images + num_skipped_images == num_images_source: an annotation reported without an id (it has none)
    must not count as a skipped image."""
    from pipelines.data.coco import read_split
    from pipelines.data.preprocess import skipped_images

    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 20},
                       {"id": 2, "file_name": "../b.png", "height": 20, "width": 20}],
            "annotations": [{"image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 5, 5],
                             "segmentation": [[1, 1, 6, 1, 6, 6]], "area": 25.0}],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    source = read_split(str(tmp_path / "ann.json"), str(tmp_path))
    assert any(e["annotation_id"] is None and e["reason"].startswith("malformed_annotation") for e in source.skipped)
    assert [e["image_id"] for e in skipped_images(source.skipped)] == [2]  # the unsafe path only


def test_instances_beyond_the_limit_keep_the_largest(tmp_path):
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(tmp_path / "a.png")
    sides = [2, 9, 4, 7, 3]  # squares at x = 10 * k; the limit keeps the 3 largest: sides 9, 7, 4
    anns = [{"id": k + 1, "category_id": 1, "iscrowd": 0, "area": float(s * s), "bbox": [10.0 * k, 5.0, s, s],
             "segmentation": [[10.0 * k, 5, 10.0 * k + s, 5, 10.0 * k + s, 5 + s, 10.0 * k, 5 + s]]}
            for k, s in enumerate(sides)]
    record = {"image_id": 1, "file_name": "a.png", "path": str(tmp_path / "a.png"), "height": 40, "width": 60,
              "annotations": anns}
    maker = RowMaker(shapes().override(["roi.max_gt_instances=3"]).to_dict(), torch_threads=None)
    row, reports = maker.make(record)
    assert reports == [] and row["_dropped"] == 2 and row["num_instances"] == 3
    got = decode_row(row)
    scale = 128 / 60
    expected = np.array([[10, 5, 19, 14], [20, 5, 24, 9], [30, 5, 37, 12]], np.float32) * scale  # original order
    np.testing.assert_allclose(got["gt_boxes"], expected, rtol=1e-6)
    # mini pixel (u, v) is set where its centre, mapped back to original pixels, falls inside the square
    mini_boxes = np.floor(expected[:, :2]), np.ceil(expected[:, 2:])
    for k, (x, side) in enumerate([(10, 9), (20, 4), (30, 7)]):
        lo, hi = mini_boxes[0][k] / scale, mini_boxes[1][k] / scale  # (x1, y1), (x2, y2) in original pixels
        centres = lo[:, None] + (np.arange(56) + 0.5) * (hi - lo)[:, None] / 56  # [2, 56]: x then y
        inside_x = (centres[0] >= x) & (centres[0] < x + side)
        inside_y = (centres[1] >= 5) & (centres[1] < 5 + side)
        agree = (got["mini_masks"][k] == (inside_y[:, None] & inside_x[None, :])).mean()
        assert agree > 0.97, (k, agree)


def test_split_writer_sizes_files_and_row_groups(tmp_path):
    from pyarrow import fs as pafs

    from pipelines.data.datasink import _SplitWriter

    table = pa.table({name: pa.nulls(12, f.type) for name, f in zip(SHARD_SCHEMA.names, SHARD_SCHEMA, strict=True)},
                     schema=SHARD_SCHEMA)
    table = table.set_column(0, "image_id", pa.array(range(12), pa.int64()))
    writer = _SplitWriter(pafs.LocalFileSystem(), str(tmp_path / "s"), "part-00007", rows_per_shard=5,
                          rows_per_row_group=2)
    for start in range(0, 12, 3):  # blocks of 3 rows
        writer.append(table.slice(start, 3))
    writer.close()
    assert writer.files == ["part-00007-000.parquet", "part-00007-001.parquet", "part-00007-002.parquet"]
    groups = [[pq.ParquetFile(tmp_path / "s" / f).metadata.row_group(i).num_rows
               for i in range(pq.ParquetFile(tmp_path / "s" / f).metadata.num_row_groups)] for f in writer.files]
    assert groups == [[2, 2, 1], [2, 2, 1], [2]]
    ids = pa.concat_tables([pq.read_table(tmp_path / "s" / f) for f in writer.files])["image_id"].to_pylist()
    assert ids == list(range(12))


# ---------------------------------------------------------------------------------------------- real COCO


@pytest.mark.slow
def test_coco128_preprocesses_without_unexpected_skips(ray_session, shared_data, tmp_path):
    root = shared_data / "coco128"
    out = tmp_path / "shards"
    preprocess(coco_preset(), splits=_splits(root, ["train2017"]), out=str(out), progress=False, max_workers=2)
    m = read_manifest(str(out))["splits"]["train2017"]
    assert [e for e in m["skipped"] if e["action"] == "skipped"] == []
    assert m["empty_images"]["dropped_ids"] == [250, 508]
    assert m["num_images"] == 126 and m["num_crowd"] == 10
    assert m["num_instances"] == 939 - 10
    rows = _rows(out, read_manifest(str(out)), "train2017")
    gray = next(r for r in rows if r["file_name"] == "000000000086.jpg")
    image = decode_row(gray)["image"].astype(int)
    assert (gray["height"], gray["width"]) == (640, 512) and image.shape == (1000, 800, 3)  # 800 / 512 = 1.5625
    assert np.abs(image[..., 0] - image[..., 1]).max() == 0  # a grayscale JPEG decodes to equal channels
    assert gray["image"] == (root / "train2017" / "000000000086.jpg").read_bytes()  # kept as it is
    source_bytes = sum((root / "train2017" / r["file_name"]).stat().st_size for r in rows)
    assert sum(len(r["image"]) for r in rows) == source_bytes  # every coco128 file is an RGB or grayscale JPEG
    shutil.rmtree(out)

"""pipelines/data/shards.py: decoding one shard row, reading and checking the manifest (no Ray)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from mrcnn.config import fingerprint_diff, shapes
from mrcnn.geometry import resize_image
from mrcnn.mini_masks import pack_masks
from pipelines.data.shards import SCHEMA_VERSION, SHARD_SCHEMA, decode_row
from pipelines.data.shardset import FingerprintMismatch, ShardSet, check_fingerprint, read_manifest


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _row(**changes):
    row = {"image_id": 5, "file_name": "x.jpg", "height": 2, "width": 3, "scale": 1.0, "window": [0, 0, 3, 2],
           "image": _png(np.arange(18, dtype=np.uint8).reshape(2, 3, 3)),
           "gt_class_ids": [], "gt_boxes": [], "mini_masks": b"", "crowd_boxes": [],
           "rpn_pos_idx": [3], "rpn_pos_deltas": [0.1, 0.2, 0.3, 0.4], "rpn_ignore_idx": [0, 9],
           "num_instances": 0, "num_crowd": 0}
    return {**row, **changes}


def test_decode_row_densifies_rpn_targets_and_refuses_another_anchor_set():
    got = decode_row(_row(), num_anchors=10, mini_mask_size=56)
    assert got["rpn_match"].tolist() == [-1, 0, 0, 1, 0, 0, 0, 0, 0, -1]
    assert got["rpn_deltas"][3].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert got["rpn_deltas"][[0, 1, 2, 4]].sum() == 0
    assert got["image"].tolist() == np.arange(18).reshape(2, 3, 3).tolist()  # PNG: lossless
    assert got["mini_masks"].shape == (0, 56, 56) and got["gt_boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match="rpn_ignore_idx of image 5 outside 0..7"):
        decode_row(_row(), num_anchors=8)


def test_decode_row_unpacks_masks_and_reshapes_boxes():
    masks = np.zeros((2, 56, 56), bool)
    masks[0, :10, :20] = True
    masks[1, 30:, 5] = True
    row = _row(gt_class_ids=[3, 1], gt_boxes=[1, 2, 3, 4, 5, 6, 7, 8], mini_masks=pack_masks(masks),
               crowd_boxes=[0.5, 0.5, 1.5, 1.5], num_instances=2, num_crowd=1)
    table = pa.Table.from_pylist([row], schema=SHARD_SCHEMA)  # what a Parquet read gives back
    got = decode_row(table.to_pylist()[0])
    assert got["gt_class_ids"].tolist() == [3, 1] and got["gt_class_ids"].dtype == np.int64
    assert got["gt_boxes"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert got["crowd_boxes"].tolist() == [[0.5, 0.5, 1.5, 1.5]]
    assert (got["mini_masks"] == masks).all()  # size 56 read back from the byte count
    assert "rpn_match" not in got


def test_manifest_must_exist_and_match_the_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_manifest(str(tmp_path))
    config = shapes()
    manifest = {"schema_version": SCHEMA_VERSION, "fingerprint": config.fingerprint(),
                "shard_fields": config.shard_fields(),
                "splits": {"val2017": {"files": ["val2017/part-00000-000.parquet"]}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(str(tmp_path)) == manifest
    assert ShardSet.open(str(tmp_path)).uris("val2017") == [f"{tmp_path}/val2017/part-00000-000.parquet"]
    check_fingerprint(manifest, config)
    check_fingerprint(manifest, config.override(["train.lr=0.5"]))  # not a shard field
    with pytest.raises(FingerprintMismatch) as e:
        check_fingerprint(manifest, config.override(["image.max_dim=256", "mask.mini_mask_size=28"]))
    assert e.value.fields == ["image.max_dim: 128 != 256", "mask.mini_mask_size: 56 != 28"]
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 0}))
    with pytest.raises(ValueError, match="schema version 0"):
        read_manifest(str(tmp_path))


def test_schema_v1_shards_are_refused_with_what_to_do(tmp_path):
    config = shapes()
    manifest = {"schema_version": 1, "fingerprint": config.fingerprint(), "shard_fields": config.shard_fields()}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"schema version 1, this code reads 2 \(v1 shards hold resized") as e:
        read_manifest(str(tmp_path))
    assert "rerun `mrcnn-cli preprocess`" in str(e.value) and str(tmp_path) in str(e.value)


def test_decode_row_resizes_the_stored_image_to_its_window():
    """v2 rows hold the source image at its own size; the window says the size the network sees."""
    pixels = (np.arange(90, dtype=np.uint8) * 2).reshape(5, 6, 3)
    got = decode_row(_row(image=_png(pixels), height=5, width=6, scale=2.0, window=[0, 0, 12, 10]))
    expected = resize_image(torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), 10, 12).permute(1, 2, 0)
    assert got["image"].shape == (10, 12, 3) and np.array_equal(got["image"], expected.numpy())
    assert "image" not in decode_row(_row(), image=False)
    with pytest.raises(ValueError, match=r"image 5 \(x.jpg\) in the shards: image bytes are neither JPEG nor PNG"):
        decode_row(_row(image=b"not an image"))


def test_shard_fields_of_manifests_written_before_the_anchor_conventions_read_as_their_old_values():
    """A manifest from before rpn.anchor_offset and rpn.round_anchors existed lacks them: its anchors were centred
    and unrounded, which is what the diff (and so check_fingerprint, check_model_fits and resume) takes them to be."""
    config = shapes()
    old = {k: v for k, v in config.shard_fields().items() if k not in ("rpn.anchor_offset", "rpn.round_anchors")}
    assert fingerprint_diff(old, config.shard_fields()) == []
    check_fingerprint({"fingerprint": "written-before", "shard_fields": old}, config)
    off = config.override(["rpn.anchor_offset=0.0", "train.flip=false"])
    assert fingerprint_diff(old, off.shard_fields()) == ["rpn.anchor_offset: 0.5 != 0.0"]
    with pytest.raises(FingerprintMismatch, match=r"rpn\.anchor_offset: 0\.5 != 0\.0"):
        check_fingerprint({"fingerprint": "written-before", "shard_fields": old}, off)
    with pytest.raises(FingerprintMismatch, match="fingerprint"):  # same fields, another fingerprint: not trusted
        check_fingerprint({"fingerprint": "other", "shard_fields": config.shard_fields()}, config)

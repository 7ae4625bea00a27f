"""Shard rows -> the model's fixed-shape Batch, in Ray Data (real Parquet shards from the synthetic set)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mrcnn.anchors import anchors_from_config
from mrcnn.config import shapes
from pipelines.data.loader import ShardBatchDecoder, batches_dataset, decoder_for, densify_rpn_deltas
from pipelines.data.shards import MAX_CROWD, decode_row
from pipelines.data.shardset import ShardSet


@pytest.fixture(scope="module")
def rows(synth_shards):
    table = pq.read_table(f"{synth_shards}/train2017")
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def test_decoded_batch_matches_the_contract(rows):
    config = shapes()
    a = anchors_from_config(config).shape[0]
    out = ShardBatchDecoder(**decoder_for(config, a))(rows)
    n, s, g, m = len(rows["image_id"]), config.image.max_dim, config.roi.max_gt_instances, config.mask.mini_mask_size
    expected = {
        "images": ((n, 3, s, s), np.uint8), "windows": ((n, 4), np.int64), "image_ids": ((n,), np.int64),
        "scales": ((n,), np.float32), "heights": ((n,), np.int64), "widths": ((n,), np.int64),
        "gt_class_ids": ((n, g), np.int64), "gt_boxes": ((n, g, 4), np.float32),
        "gt_mini_masks": ((n, g, m, m), np.uint8), "crowd_boxes": ((n, MAX_CROWD, 4), np.float32),
        "rpn_match": ((n, a), np.int8), "rpn_pos_idx": ((n, config.rpn.anchors_per_image), np.int64),
        "rpn_pos_deltas": ((n, config.rpn.anchors_per_image, 4), np.float32),
    }
    assert set(out) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert out[key].shape == shape and out[key].dtype == dtype, key
    for i in range(n):
        x1, y1, x2, y2 = out["windows"][i]
        assert (x1, y1) == (0, 0)
        # zero padding below and right of the window
        assert out["images"][i, :, y2:, :].max(initial=0) == 0 and out["images"][i, :, :, x2:].max(initial=0) == 0
        assert out["images"][i, :, :y2, :x2].mean() > 0
        k = int(rows["num_instances"][i])
        assert (out["gt_class_ids"][i] > 0).sum() == k and set(out["gt_class_ids"][i, :k]) <= {1, 2, 3}
        assert out["gt_mini_masks"][i, :k].reshape(k, -1).max(axis=1).min(initial=1) == 1  # every mask non-empty
        assert (out["rpn_match"][i] == 1).sum() == len(rows["rpn_pos_idx"][i])
        assert (out["rpn_match"][i] == -1).sum() == len(rows["rpn_ignore_idx"][i])

    dense = densify_rpn_deltas({k: torch.as_tensor(v) for k, v in out.items()})
    assert dense["rpn_deltas"].shape == (n, a, 4) and "rpn_pos_idx" not in dense
    for i in range(n):
        pos = np.array(rows["rpn_pos_idx"][i])  # a copy: Arrow's arrays are read-only
        assert np.allclose(dense["rpn_deltas"][i][pos], np.asarray(rows["rpn_pos_deltas"][i]).reshape(-1, 4))
        assert not dense["rpn_deltas"][i][dense["rpn_match"][i] != 1].any()


def test_sparse_deltas_densified_equal_the_dense_targets_of_each_row(rows):
    """What the device rebuilds from the shipped sparse deltas is exactly the per-image dense form (decode_row
    with the anchor count, the loader's former output), labels included."""
    config = shapes()
    a = anchors_from_config(config).shape[0]
    out = ShardBatchDecoder(**decoder_for(config, a))(rows)
    dense = densify_rpn_deltas({k: torch.as_tensor(v) for k, v in out.items()})
    assert any(len(p) for p in rows["rpn_pos_idx"])
    for i in range(len(rows["image_id"])):
        row = decode_row({k: v[i] for k, v in rows.items()}, num_anchors=a)
        assert torch.equal(dense["rpn_match"][i], torch.as_tensor(row["rpn_match"]))
        assert torch.equal(dense["rpn_deltas"][i], torch.as_tensor(row["rpn_deltas"]))


def test_an_image_with_more_positives_than_shipped_keeps_a_seeded_subset_and_ignores_the_rest(rows):
    config = shapes()
    a = anchors_from_config(config).shape[0]
    i = int(np.argmax([len(p) for p in rows["rpn_pos_idx"]]))
    pos = np.asarray(rows["rpn_pos_idx"][i])
    k = len(pos) // 2
    assert k >= 2
    kwargs = {**decoder_for(config, a), "max_positives": k}
    one = {key: v[i : i + 1] for key, v in rows.items()}
    out, again = ShardBatchDecoder(**kwargs)(one), ShardBatchDecoder(**kwargs)(one)
    kept = out["rpn_pos_idx"][0]
    assert len(kept) == k and (kept >= 0).all() and set(kept) < set(pos)  # K of the image's positives
    assert np.array_equal(kept, again["rpn_pos_idx"][0])  # the same K every time (seeded by the image id)
    match = out["rpn_match"][0]
    assert (match == 1).sum() == k and set(np.flatnonzero(match == 1)) == set(kept)
    dropped = np.setdiff1d(pos, kept)
    assert (match[dropped] == -1).all()  # neither positive nor negative
    deltas = np.asarray(rows["rpn_pos_deltas"][i]).reshape(-1, 4)
    assert np.array_equal(out["rpn_pos_deltas"][0], deltas[np.searchsorted(pos, kept)])


def test_ray_data_stream_gives_the_same_batches(synth_shards, rows):
    config = shapes()
    a = anchors_from_config(config).shape[0]
    direct = ShardBatchDecoder(**decoder_for(config, a))(rows)
    order = {int(i): k for k, i in enumerate(direct["image_ids"])}
    seen = 0
    ds = batches_dataset(ShardSet.open(synth_shards), "train2017", config, a)
    for batch in ds.iter_torch_batches(batch_size=3, device="cpu"):
        for j, image_id in enumerate(batch["image_ids"].tolist()):
            k = order[image_id]
            for key in ("images", "gt_boxes", "gt_mini_masks", "rpn_match", "rpn_pos_idx", "rpn_pos_deltas"):
                assert torch.equal(batch[key][j], torch.as_tensor(direct[key][k])), key
            seen += 1
    assert seen == len(order)

"""The loader's RPN targets by hand (pipelines/data/loader.py): a row's sparse labels -> the shipped match and
positives, the seeded cut at max_positives, the device's densifying, the decoder's settings. Pure: no shards,
no Ray (test_loader checks the same on the synthetic shards)."""

import numpy as np
import pytest
import torch

from mrcnn.config import shapes
from pipelines.data.loader import decoder_for, densify_rpn_deltas, rpn_labels


def _row(pos, ignore, image_id=5):
    pos = np.asarray(pos, np.int64)
    return {"image_id": image_id, "rpn_pos_idx": pos, "rpn_ignore_idx": np.asarray(ignore, np.int64),
            "rpn_pos_deltas": np.arange(len(pos) * 4, dtype=np.float32).reshape(-1, 4)}


def test_a_rows_labels_by_hand():
    row = _row([1, 4], [0, 6])
    match, idx, deltas = rpn_labels(row, num_anchors=8, max_positives=2)  # exactly max_positives: all kept
    assert match.dtype == np.int8 and match.tolist() == [-1, 1, 0, 0, 1, 0, -1, 0]
    assert idx.tolist() == [1, 4] and np.array_equal(deltas, row["rpn_pos_deltas"])


def test_positives_past_max_positives_a_draw_seeded_by_the_image_id():
    pos = [0, 2, 3, 5, 7, 9]
    row = _row(pos, [1], image_id=11)
    match, idx, deltas = rpn_labels(row, num_anchors=10, max_positives=4)
    keep = np.sort(np.random.default_rng(11).choice(6, 4, replace=False))  # the documented draw
    assert idx.tolist() == np.asarray(pos)[keep].tolist() and np.array_equal(deltas, row["rpn_pos_deltas"][keep])
    expected = np.zeros(10, np.int8)
    expected[[1, *pos]] = -1  # the ignored anchor and the positives left out
    expected[idx] = 1
    assert match.tolist() == expected.tolist()
    others = {tuple(rpn_labels(_row(pos, [1], image_id=i), num_anchors=10, max_positives=4)[1]) for i in range(8)}
    assert len(others) > 1  # another image, another subset
    # a negative id (COCO's are int64) seeds with its 64-bit two's complement, as numpy takes no negative seed
    many = list(range(0, 40, 2))  # 20 positives, 4 kept: 4845 subsets, so another seed gives another one
    negative = rpn_labels(_row(many, [], image_id=-3), num_anchors=40, max_positives=4)[1]
    keep = np.sort(np.random.default_rng(2**64 - 3).choice(20, 4, replace=False))
    assert negative.tolist() == np.asarray(many)[keep].tolist()


def test_indices_outside_the_anchors_are_refused():
    with pytest.raises(ValueError, match="rpn_pos_idx of image 5 outside 0..7: wrong anchor set"):
        rpn_labels(_row([8], []), num_anchors=8, max_positives=4)
    with pytest.raises(ValueError, match="rpn_ignore_idx of image 5 outside 0..7"):
        rpn_labels(_row([], [-1]), num_anchors=8, max_positives=4)


def test_densify_puts_the_shipped_deltas_at_their_anchors_and_drops_the_sparse_columns():
    images = torch.zeros(2, 3, 4, 4)
    match = torch.tensor([[0, 1, -1, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.int8)
    pos_idx = torch.tensor([[4, 1, -1], [-1, -1, -1]])
    pos_deltas = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) + 1
    out = densify_rpn_deltas({"images": images, "rpn_match": match, "rpn_pos_idx": pos_idx,
                              "rpn_pos_deltas": pos_deltas})
    assert set(out) == {"images", "rpn_match", "rpn_deltas"}
    assert out["images"] is images and out["rpn_match"] is match
    expected = torch.zeros(2, 6, 4)
    expected[0, 4], expected[0, 1] = pos_deltas[0, 0], pos_deltas[0, 1]
    assert out["rpn_deltas"].dtype == torch.float32 and torch.equal(out["rpn_deltas"], expected)
    dense = {"images": images, "rpn_match": match, "rpn_deltas": expected}
    assert densify_rpn_deltas(dense) is dense  # already dense (or inference): as it is


def test_every_setting_the_decoder_reads_reaches_it():
    config = shapes().override(["image.min_dim=192", "image.max_dim=192", "roi.max_gt_instances=7",
                                "mask.mini_mask_size=24", "rpn.anchors_per_image=40"])
    assert decoder_for(config, 123) == {"image_size": 192, "max_instances": 7, "mini_mask_size": 24,
                                        "num_anchors": 123, "max_positives": 40}

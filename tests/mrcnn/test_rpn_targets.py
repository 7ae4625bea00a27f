import math
import time

import pytest
import torch
from torchvision.ops import box_iou

from mrcnn.anchors import anchors_from_config
from mrcnn.box_coder import encode
from mrcnn.config import coco
from mrcnn.rpn_targets import _pairwise_iou, compute_rpn_targets, dense_rpn_targets, sample_anchors

NO_BOXES = torch.zeros(0, 4)
STD = (0.1, 0.1, 0.2, 0.2)
# the coco preset's labelling
RULES = dict(positive_iou=0.7, negative_iou=0.3, crowd_iou=0.001, bbox_std=STD)


def _targets(anchors, gt, crowd=NO_BOXES, **kwargs):
    return compute_rpn_targets(
        anchors=torch.tensor(anchors, dtype=torch.float32),
        gt_boxes=torch.tensor(gt, dtype=torch.float32).reshape(-1, 4),
        crowd_boxes=torch.as_tensor(crowd, dtype=torch.float32).reshape(-1, 4),
        **{**RULES, **kwargs},
    )


def test_positive_ignored_negative_by_iou():
    gt = [[0, 0, 10, 10]]
    anchors = [
        [0, 0, 10, 10],  # IoU 1: positive
        [0, 0, 10, 20],  # 100 / 200 = 0.5: ignored
        [5, 0, 15, 10],  # 50 / 150 = 0.33: ignored
        [0, 0, 10, 40],  # 100 / 400 = 0.25: negative
        [50, 50, 60, 60],  # 0: negative
        [1, 0, 10, 10],  # 90 / 100 = 0.9: positive, deltas to the gt box
    ]
    t = _targets(anchors, gt)
    assert t.pos_idx.tolist() == [0, 5]
    assert t.ignore_idx.tolist() == [1, 2]
    assert t.pos_idx.dtype == torch.int64 and t.ignore_idx.dtype == torch.int64
    assert t.pos_deltas.dtype == torch.float32
    # anchor 5: centre 5.5, width 9 -> dx = (5 - 5.5) / 9 / 0.1, dw = log(10 / 9) / 0.2
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-0.5 / 9 / 0.1, 0.0, torch.tensor(10 / 9).log() / 0.2, 0.0]])
    torch.testing.assert_close(t.pos_deltas, expected)


def test_thresholds_are_inclusive_and_configurable():
    # anchor 0 (IoU 1) is the gt box's best anchor, so the others are labelled by their IoU alone; the IoUs are
    # exact in float32 (areas 1:2 and 1:4 nested): 0.5 is positive at positive_iou 0.5, 0.25 ignored at
    # negative_iou 0.25
    gt = [[0, 0, 10, 10]]
    anchors = [[0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 40], [0, 0, 10, 100]]  # IoU 1, 0.5, 0.25, 0.1
    t = _targets(anchors, gt, positive_iou=0.5, negative_iou=0.25)
    assert t.pos_idx.tolist() == [0, 1] and t.ignore_idx.tolist() == [2]
    # just above each threshold the same anchors fall one class lower
    t = _targets(anchors, gt, positive_iou=0.51, negative_iou=0.26)
    assert t.pos_idx.tolist() == [0] and t.ignore_idx.tolist() == [1]


def test_the_coco_thresholds_met_exactly():
    # the preset's 0.7 / 0.3 / 0.001: IoU 70 / 100, 30 / 100 and (crowd) 1 / 1000, each the float32 of the
    # threshold; anchor 0 is the best anchor of the gt box, so no other anchor is positive by that rule
    gt = [[0, 0, 10, 10]]
    crowd = [[200, 0, 201, 1]]
    anchors = [
        [0, 0, 10, 10],  # IoU 1: positive (best)
        [0, 0, 10, 7],  # 0.7: positive (>= positive_iou)
        [0, 0, 10, 3],  # 0.3: ignored (>= negative_iou)
        [0, 0, 10, 2],  # 0.2: negative
        [200, 0, 210, 100],  # crowd IoU 1 / 1000 = crowd_iou: ignored
        [200, 0, 210, 101],  # crowd IoU 1 / 1010 < crowd_iou: negative
    ]
    t = _targets(anchors, gt, crowd)
    assert t.pos_idx.tolist() == [0, 1] and t.ignore_idx.tolist() == [2, 4]
    # the positive at the threshold gets its deltas to the gt box: dy = (5 - 3.5) / 7 / 0.1, dh = log(10 / 7) / 0.2
    torch.testing.assert_close(t.pos_deltas[1], torch.tensor([0.0, 1.5 / 7 / 0.1, 0.0, math.log(10 / 7) / 0.2]))


def test_settings_reach_compute_rpn_targets():
    from mrcnn.rpn_targets import RPNTargetSettings

    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    crowd = torch.tensor([[200.0, 0.0, 201.0, 1.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 40.0],
                            [200.0, 0.0, 210.0, 10.0], [1.0, 0.0, 10.0, 10.0]])  # IoU 1, .5, .25, crowd .01, .9

    def run(*overrides):
        config = coco().override(["rpn.positive_iou=0.7", "rpn.negative_iou=0.3", "rpn.crowd_iou=0.001",
                                  "rpn.bbox_std=[0.1,0.1,0.2,0.2]", *overrides])
        t = RPNTargetSettings.from_config(config).compute(anchors=anchors, gt_boxes=gt, crowd_boxes=crowd)
        return t.pos_idx.tolist(), t.ignore_idx.tolist(), round(t.pos_deltas[-1, 2].item(), 4)

    dw = round(math.log(10 / 9) / 0.2, 4)
    assert run() == ([0, 4], [1, 3], dw)
    assert run("rpn.positive_iou=0.5") == ([0, 1, 4], [3], dw)
    assert run("rpn.negative_iou=0.25") == ([0, 4], [1, 2, 3], dw)
    assert run("rpn.crowd_iou=0.02") == ([0, 4], [1], dw)
    assert run("rpn.bbox_std=[0.1,0.1,0.1,0.2]") == ([0, 4], [1, 3], round(math.log(10 / 9) / 0.1, 4))


def test_best_anchor_rule_keeps_every_tie():
    gt = [[100, 100, 130, 130]]
    anchors = [
        [100, 100, 110, 110],  # 100 / 900: best, tied
        [120, 120, 130, 130],  # 100 / 900: best, tied
        [100, 100, 105, 105],  # 25 / 900: negative
    ]
    t = _targets(anchors, gt)
    assert t.pos_idx.tolist() == [0, 1]
    assert t.ignore_idx.tolist() == []
    gt_twice = torch.tensor(gt * 2, dtype=torch.float32)
    torch.testing.assert_close(t.pos_deltas, encode(gt_twice, torch.tensor(anchors[:2], dtype=torch.float32), std=STD))


def test_gt_box_with_no_overlapping_anchor_makes_no_positive():
    t = _targets([[0, 0, 10, 10], [20, 0, 30, 10]], [[100, 100, 110, 110]])
    assert t.pos_idx.numel() == 0 and t.ignore_idx.numel() == 0 and t.pos_deltas.shape == (0, 4)


def test_positive_deltas_go_to_the_argmax_gt_box():
    # anchor 0 is the best anchor of gt A (IoU 50 / 250 = 0.2; anchor 1 has 50 / 340) but overlaps gt B more
    # (100 / 200 = 0.5); B's own best anchor is 1 (190 / 200). Anchor 0's deltas go to B.
    gt_a = [5, 0, 25, 10]
    gt_b = [0, 0, 10, 20]
    anchors = [[0, 0, 10, 10], [0, 0, 10, 19]]
    t = _targets(anchors, [gt_a, gt_b])
    assert t.pos_idx.tolist() == [0, 1]
    refs = torch.tensor(anchors, dtype=torch.float32)
    torch.testing.assert_close(t.pos_deltas, encode(torch.tensor([gt_b, gt_b], dtype=torch.float32), refs, std=STD))


def test_crowd_overlap_is_ignored_but_never_overrides_a_positive():
    gt = [[0, 0, 10, 10]]
    crowd = [[50, 50, 51, 51], [0, 0, 1, 1]]
    anchors = [
        [0, 0, 10, 10],  # positive, although IoU 0.01 with the second crowd box
        [50, 50, 60, 60],  # IoU 1 / 100 with a crowd box: ignored instead of negative
        [70, 70, 80, 80],  # negative
    ]
    t = _targets(anchors, gt, crowd)
    assert t.pos_idx.tolist() == [0] and t.ignore_idx.tolist() == [1]
    # the crowd threshold is configurable
    assert _targets(anchors, gt, crowd, crowd_iou=0.05).ignore_idx.tolist() == []


def test_no_gt_boxes_all_negative_except_crowd():
    anchors = [[0, 0, 10, 10], [50, 50, 60, 60]]
    t = _targets(anchors, [])
    assert t.pos_idx.numel() == 0 and t.ignore_idx.numel() == 0 and t.pos_deltas.shape == (0, 4)
    t = _targets(anchors, [], [[55, 55, 70, 70]])
    assert t.pos_idx.numel() == 0 and t.ignore_idx.tolist() == [1]


def test_pairwise_iou_equals_torchvision_box_iou():
    # the in-place IoU used for speed must agree with box_iou, including zero-area gt boxes and disjoint pairs
    g = torch.Generator().manual_seed(0)
    anchors = anchors_from_config(coco())[::7]
    xy = torch.rand(50, 2, generator=g) * 1000
    boxes = torch.cat([xy, xy + torch.rand(50, 2, generator=g) * 200], dim=1)
    boxes[0, 2] = boxes[0, 0]  # zero width
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    torch.testing.assert_close(_pairwise_iou(anchors, boxes, area), box_iou(anchors, boxes), rtol=0, atol=1e-6)


def _reference(anchors, gt, crowd, pos_iou=0.7, neg_iou=0.3, crowd_iou=0.001):
    """The rules written directly on torchvision's box_iou, one full [A, G] matrix."""
    iou = box_iou(anchors, gt)
    max_iou, argmax = iou.max(dim=1)
    best = iou.max(dim=0).values
    positive = (max_iou >= pos_iou) | ((iou == best) & (best > 0)).any(dim=1)
    crowd_hit = (box_iou(anchors, crowd) >= crowd_iou).any(dim=1) if len(crowd) else torch.zeros_like(positive)
    ignored = ~positive & ((max_iou >= neg_iou) | crowd_hit)
    pos_idx = positive.nonzero().flatten()
    return pos_idx, encode(gt[argmax[pos_idx]], anchors[pos_idx], std=STD), ignored.nonzero().flatten()


@pytest.mark.parametrize("seed", range(4))
def test_matches_a_direct_box_iou_reference(seed):
    # coco anchors on a 512 px input: 16,368 anchors, so several IoU chunks
    g = torch.Generator().manual_seed(seed)
    anchors = anchors_from_config(coco().override(["image.min_dim=512", "image.max_dim=512"]))
    assert anchors.shape[0] == 16_368
    xy = torch.rand(30, 2, generator=g) * 450
    wh = torch.rand(30, 2, generator=g) * 150 + 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    gt, crowd = boxes[:27], boxes[27:]
    t = compute_rpn_targets(anchors=anchors, gt_boxes=gt, crowd_boxes=crowd, **RULES)
    pos_idx, pos_deltas, ignore_idx = _reference(anchors, gt, crowd)
    assert torch.equal(t.pos_idx, pos_idx)
    assert torch.equal(t.ignore_idx, ignore_idx)
    torch.testing.assert_close(t.pos_deltas, pos_deltas)
    assert t.pos_idx.numel() >= 1


def test_65k_anchors_by_100_gt_boxes_is_fast():
    g = torch.Generator().manual_seed(0)
    anchors = anchors_from_config(coco())
    xy = torch.rand(100, 2, generator=g) * 900
    boxes = torch.cat([xy, xy + torch.rand(100, 2, generator=g) * 300 + 4], dim=1)
    # one thread and CPU time, not wall time: other processes sharing the cores (and OpenMP threads spinning
    # while they wait for them) would make a wall-clock bound flaky. Ray tasks run single-threaded too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compute_rpn_targets(anchors=anchors, gt_boxes=boxes, crowd_boxes=boxes[:3], **RULES)  # warm-up
        start = time.process_time()
        compute_rpn_targets(anchors=anchors, gt_boxes=boxes, crowd_boxes=boxes[:3], **RULES)
        elapsed = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    # ~0.1 s on one idle core (0.05-0.1 s wall with two threads). The bound catches a fall back to Python loops
    # over anchors or gt boxes, with room for a slow CI machine.
    assert elapsed < 1.0, f"compute_rpn_targets took {elapsed:.3f} s of CPU"


def test_dense_rpn_targets_by_hand():
    match, deltas = dense_rpn_targets(5, [3, 0], [[1, 2, 3, 4], [5, 6, 7, 8]], [2])
    assert match.dtype == torch.int8 and deltas.dtype == torch.float32
    assert match.tolist() == [1, 0, -1, 1, 0]
    expected = torch.tensor([[5.0, 6, 7, 8], [0, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0]])
    torch.testing.assert_close(deltas, expected)


def test_dense_rpn_targets_empty():
    match, deltas = dense_rpn_targets(3, [], torch.zeros(0, 4), [])
    assert match.tolist() == [0, 0, 0] and deltas.abs().sum() == 0


def test_sampler_four_at_quarter_fraction_picks_one_positive_three_negatives():
    # anchors 0-4 positive, 5-9 negative, 10-14 ignored
    row = torch.tensor([1] * 5 + [0] * 5 + [-1] * 5, dtype=torch.int8)
    pos, neg = sample_anchors(row[None], num_samples=4, positive_fraction=0.25)
    assert pos.dtype == torch.bool and pos.shape == (1, 15)
    assert pos.sum() == 1 and pos[0, :5].sum() == 1
    assert neg.sum() == 3 and neg[0, 5:10].sum() == 3
    assert not (pos & neg).any()


def test_sampler_fills_with_negatives_and_takes_what_there_is_per_row():
    match = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, -1, -1],  # 1 positive: 1 + 5 negatives = 6 (only 5 negatives)
            [1, 1, 1, 1, 0, 0, 0, 0],  # 4 positives, at most 2 taken, 2 negatives of 4
            [-1, -1, -1, -1, -1, -1, -1, -1],  # nothing to sample
            [0, 0, 0, 0, 0, 0, 0, 0],  # no positives: 4 negatives
        ],
        dtype=torch.int8,
    )
    pos, neg = sample_anchors(match, num_samples=4, positive_fraction=0.5, generator=torch.Generator().manual_seed(0))
    assert pos.sum(1).tolist() == [1, 2, 0, 0]
    assert neg.sum(1).tolist() == [3, 2, 0, 4]
    assert (pos <= (match == 1)).all() and (neg <= (match == 0)).all()


def test_sampler_is_uniform_and_seeded():
    # 4000 identical rows: each of 8 positives is picked in about 2 / 8 of them, each of 8 negatives in 2 / 8
    match = torch.tensor([1] * 8 + [0] * 8 + [-1] * 4, dtype=torch.int8).repeat(4000, 1)
    pos, neg = sample_anchors(match, num_samples=4, positive_fraction=0.5, generator=torch.Generator().manual_seed(1))
    assert (pos.sum(1) == 2).all() and (neg.sum(1) == 2).all()
    frac = (pos | neg).float().mean(0)
    torch.testing.assert_close(frac[:16], torch.full((16,), 0.25), atol=0.03, rtol=0)
    assert frac[16:].sum() == 0
    again = sample_anchors(match, num_samples=4, positive_fraction=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], pos) and torch.equal(again[1], neg)


def test_sampler_all_positive_fraction_takes_no_negative():
    # positive_fraction 1 with positives enough for the whole sample: no room left for a negative
    match = torch.tensor([[1] * 6 + [0] * 6], dtype=torch.int8)
    pos, neg = sample_anchors(match, num_samples=4, positive_fraction=1.0)
    assert pos.sum().item() == 4 and neg.sum().item() == 0


def test_sampler_on_an_empty_batch():
    pos, neg = sample_anchors(torch.zeros(0, 5, dtype=torch.int8), num_samples=4, positive_fraction=0.5)
    assert pos.shape == neg.shape == (0, 5)


def test_scatter_positive_deltas_equals_the_dense_targets_per_image():
    from mrcnn.rpn_targets import scatter_positive_deltas

    # image 0: positives 3 and 0, one padding slot; image 1: positive 4 only
    pos_idx = torch.tensor([[3, 0, -1], [4, -1, -1]])
    pos_deltas = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4) + 1
    dense = scatter_positive_deltas(6, pos_idx, pos_deltas)
    assert dense.shape == (2, 6, 4) and dense.dtype == torch.float32
    for i in range(2):
        valid = pos_idx[i] >= 0
        _, expected = dense_rpn_targets(6, pos_idx[i][valid], pos_deltas[i][valid], [])
        torch.testing.assert_close(dense[i], expected)
    assert dense[0, 3].tolist() == [1.0, 2.0, 3.0, 4.0] and dense[1, 4].tolist() == [13.0, 14.0, 15.0, 16.0]
    # the shards store the indices as int32 (scatter_ needs int64: converted inside)
    torch.testing.assert_close(scatter_positive_deltas(6, pos_idx.to(torch.int32), pos_deltas), dense)

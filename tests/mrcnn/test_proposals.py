from __future__ import annotations

import pytest
import torch

from mrcnn.proposals import clip_to_window, flat_proposals, generate_proposals, top_per_group

# a0 and a1 overlap (IoU 18*20 / (22*20) = 0.82 > 0.7); a3 sticks out of a 100x100 window; a4 is 0.5 px wide.
ANCHORS = torch.tensor(
    [
        [10.0, 10.0, 30.0, 30.0],
        [12.0, 10.0, 32.0, 30.0],
        [60.0, 60.0, 80.0, 80.0],
        [90.0, 90.0, 130.0, 130.0],
        [50.0, 50.0, 50.5, 70.0],
    ]
)
STD = (0.1, 0.1, 0.2, 0.2)
SETTINGS = {"nms_threshold": 0.7, "bbox_std": STD, "min_size": 1.0}


def _run(logits, windows, deltas=None, pre=5, post=10):
    logits = torch.tensor(logits)
    deltas = torch.zeros(*logits.shape, 4) if deltas is None else deltas
    return generate_proposals(
        logits, deltas, ANCHORS, torch.tensor(windows), pre_nms_topk=pre, post_nms_topk=post, **SETTINGS
    )


def test_nms_clipping_tiny_boxes_and_decoding_per_image():
    deltas = torch.zeros(2, 5, 4)
    deltas[0, 2, 0] = 1.0  # dx = 1 * std 0.1 * width 20 = +2 px
    boxes, scores = _run(
        [[3.0, 2.0, 1.0, 0.0, 5.0], [2.0, 3.0, 1.0, 0.0, 5.0]], [[0, 0, 100, 100], [0, 0, 100, 60]], deltas
    )
    # image 0: a4 dropped (too thin), a1 suppressed by a0, a2 shifted, a3 clipped to the window
    expected0 = torch.tensor([[10.0, 10.0, 30.0, 30.0], [62.0, 60.0, 82.0, 80.0], [90.0, 90.0, 100.0, 100.0]])
    torch.testing.assert_close(boxes[0], expected0)
    torch.testing.assert_close(scores[0], torch.sigmoid(torch.tensor([3.0, 1.0, 0.0])))
    # image 1: a1 now wins over a0; a2, a3 clipped to zero height by the 60 px high window are dropped
    torch.testing.assert_close(boxes[1], torch.tensor([[12.0, 10.0, 32.0, 30.0]]))


def test_pre_and_post_nms_counts():
    windows = [[0, 0, 100, 100]]
    boxes, _ = _run([[3.0, 2.0, 1.0, 0.0, 5.0]], windows, pre=2)  # top 2: a4 (too thin) and a0
    torch.testing.assert_close(boxes[0], ANCHORS[:1])
    boxes, _ = _run([[3.0, 2.0, 1.0, 0.0, 5.0]], windows, post=2)
    torch.testing.assert_close(boxes[0], ANCHORS[[0, 2]])


def test_proposals_are_detached():
    logits = torch.zeros(1, 5, requires_grad=True)
    deltas = torch.zeros(1, 5, 4, requires_grad=True)
    boxes, scores = generate_proposals(
        logits, deltas, ANCHORS, torch.tensor([[0, 0, 100, 100]]), pre_nms_topk=5, post_nms_topk=5, **SETTINGS
    )
    assert not boxes[0].requires_grad and not scores[0].requires_grad


def test_without_nms_all_valid_boxes_come_back_in_score_order():
    boxes, scores = generate_proposals(
        torch.tensor([[0.0, 4.0, 1.0, 2.0, -1.0]]),
        torch.zeros(1, 5, 4),
        ANCHORS,
        torch.tensor([[0, 0, 200, 200]]),
        pre_nms_topk=5,
        post_nms_topk=5,
        nms_threshold=1.0,
        bbox_std=STD,
        min_size=1.0,
    )
    torch.testing.assert_close(boxes[0], ANCHORS[[1, 3, 2, 0]])
    assert torch.all(scores[0][:-1] >= scores[0][1:])


def test_clip_to_window_per_image():
    boxes = torch.tensor([[[-5.0, 2.0, 50.0, 70.0]], [[-5.0, 2.0, 50.0, 70.0]]])
    clipped = clip_to_window(boxes, torch.tensor([[0, 0, 40, 60], [10, 5, 64, 64]]))
    torch.testing.assert_close(clipped, torch.tensor([[[0.0, 2.0, 40.0, 60.0]], [[10.0, 5.0, 50.0, 64.0]]]))


def test_top_per_group_keeps_the_first_k_of_each_group_in_order():
    groups = torch.tensor([1, 0, 1, 1, 0, 2, 1])
    torch.testing.assert_close(top_per_group(groups, 2), torch.tensor([1, 4, 0, 2, 5]))
    torch.testing.assert_close(top_per_group(groups, 2, num_groups=4), torch.tensor([1, 4, 0, 2, 5]))
    assert top_per_group(groups[:0], 2, num_groups=3).tolist() == []  # nothing kept: an image without detections
    assert top_per_group(groups[:0], 2).tolist() == []  # nor without the number of groups: no max of nothing


# two levels: a0..a2 on level 0, a3, a4 on level 1; a3 overlaps a0 (IoU 0.82), a4 is far from everything
LEVEL_ANCHORS = torch.tensor(
    [
        [10.0, 10.0, 30.0, 30.0],
        [60.0, 60.0, 80.0, 80.0],
        [60.0, 10.0, 80.0, 30.0],
        [12.0, 10.0, 32.0, 30.0],
        [10.0, 60.0, 30.0, 80.0],
    ]
)


def _levels(logits, pre, *, pre_per_level=False, nms_per_level=False, post=10):
    return generate_proposals(
        torch.tensor([logits]), torch.zeros(1, 5, 4), LEVEL_ANCHORS, torch.tensor([[0, 0, 100, 100]]), pre_nms_topk=pre,
        post_nms_topk=post, nms_threshold=0.7, bbox_std=STD, min_size=1.0, level_sizes=(3, 2),
        pre_nms_per_level=pre_per_level, nms_per_level=nms_per_level,
    )


def test_pre_nms_topk_per_level_takes_each_levels_best():
    logits = [5.0, 4.0, 3.0, 1.0, 0.0]
    boxes, _ = _levels(logits, pre=2)  # over the image: a0, a1
    torch.testing.assert_close(boxes[0], LEVEL_ANCHORS[[0, 1]])
    boxes, scores = _levels(logits, pre=2, pre_per_level=True)  # a0, a1 of level 0; a3, a4 of level 1
    # a3 is suppressed by a0 (one NMS over the image); the rest in score order
    torch.testing.assert_close(boxes[0], LEVEL_ANCHORS[[0, 1, 4]])
    torch.testing.assert_close(scores[0], torch.sigmoid(torch.tensor([5.0, 4.0, 0.0])))


def test_nms_per_level_suppresses_only_within_a_level():
    logits = [5.0, 4.0, 3.0, 1.0, 0.0]
    boxes, _ = _levels(logits, pre=5, nms_per_level=True)  # a3 survives a0: another level
    torch.testing.assert_close(boxes[0], LEVEL_ANCHORS[[0, 1, 2, 3, 4]])
    boxes, _ = _levels(logits, pre=5, nms_per_level=True, post=2)  # the image's best 2 over both levels
    torch.testing.assert_close(boxes[0], LEVEL_ANCHORS[[0, 1]])
    with pytest.raises(ValueError, match="anchors per level"):
        generate_proposals(torch.zeros(1, 5), torch.zeros(1, 5, 4), LEVEL_ANCHORS, torch.tensor([[0, 0, 100, 100]]),
                           pre_nms_topk=5, post_nms_topk=5, nms_threshold=0.7, bbox_std=STD, min_size=1.0,
                           level_sizes=(3, 1), nms_per_level=True)


def test_min_size_is_a_setting():
    thin = torch.tensor([[50.0, 50.0, 50.5, 70.0]])
    kwargs = dict(pre_nms_topk=1, post_nms_topk=1, nms_threshold=0.7, bbox_std=STD)
    window = torch.tensor([[0, 0, 100, 100]])
    assert len(generate_proposals(torch.zeros(1, 1), torch.zeros(1, 1, 4), thin, window, min_size=1.0,
                                  **kwargs)[0][0]) == 0
    kept = generate_proposals(torch.zeros(1, 1), torch.zeros(1, 1, 4), thin, window, min_size=1e-3, **kwargs)[0][0]
    torch.testing.assert_close(kept, thin)


def test_every_proposal_setting_reaches_generate_proposals():
    """ProposalSettings.from_config + propose: each rpn setting, set away from the base, changes the proposals,
    and they are generate_proposals' with that value (a setting read from the config but not passed on fails)."""
    from mrcnn.anchors import AnchorSettings, anchors_from_config, anchors_per_level
    from mrcnn.config import shapes
    from mrcnn.proposals import ProposalSettings

    base = ["rpn.pre_nms_topk=300", "rpn.nms_threshold=0.7", "rpn.min_size=1.0", "rpn.bbox_std=[0.1,0.1,0.2,0.2]",
            "rpn.pre_nms_per_level=false", "rpn.nms_per_level=false"]
    config = shapes().override(base)
    anchors = anchors_from_config(config)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, anchors.shape[0], generator=g) * 3
    deltas = torch.randn(1, anchors.shape[0], 4, generator=g) * 0.5
    size = config.image.max_dim
    windows = torch.tensor([[0, 0, size, size]])
    direct = dict(pre_nms_topk=300, post_nms_topk=1000, nms_threshold=0.7, bbox_std=(0.1, 0.1, 0.2, 0.2),
                  min_size=1.0, level_sizes=tuple(anchors_per_level(AnchorSettings.from_config(config))),
                  pre_nms_per_level=False, nms_per_level=False)

    def proposals(*overrides):
        settings = ProposalSettings.from_config(shapes().override([*base, *overrides]))
        return settings.propose(logits, deltas, anchors, windows, post_nms_topk=1000)[0][0]

    reference = proposals()
    torch.testing.assert_close(reference, generate_proposals(logits, deltas, anchors, windows, **direct)[0][0])
    for overrides, changed in [
        (["rpn.pre_nms_topk=40"], {"pre_nms_topk": 40}),
        (["rpn.nms_threshold=0.3"], {"nms_threshold": 0.3}),
        (["rpn.min_size=12"], {"min_size": 12.0}),
        (["rpn.bbox_std=[0.2,0.2,0.4,0.4]"], {"bbox_std": (0.2, 0.2, 0.4, 0.4)}),
        # against the run with the first override only: 40 per level vs 40 in all; NMS in levels vs over the image
        (["rpn.pre_nms_topk=40", "rpn.pre_nms_per_level=true"], {"pre_nms_topk": 40, "pre_nms_per_level": True}),
        (["rpn.nms_threshold=0.3", "rpn.nms_per_level=true"], {"nms_threshold": 0.3, "nms_per_level": True}),
    ]:
        got = proposals(*overrides)
        expected = generate_proposals(logits, deltas, anchors, windows, **{**direct, **changed})[0][0]
        # the premise: the setting changes the result (against the base, or the pre_nms_topk=40 run)
        plain = proposals(*overrides[:1]) if len(overrides) > 1 else reference
        assert got.shape != plain.shape or not torch.equal(got, plain), overrides
        torch.testing.assert_close(got, expected, msg=str(overrides))

    # the flat form (what the model runs) with the same settings, two images, a post-NMS count of its own
    settings = ProposalSettings.from_config(shapes().override([*base, "rpn.nms_per_level=true"]))
    two = (logits.repeat(2, 1), deltas.repeat(2, 1, 1), anchors, torch.cat([windows, windows // 2]))
    got = settings.propose_flat(*two, post_nms_topk=50)
    want = flat_proposals(*two, **{**direct, "post_nms_topk": 50, "nms_per_level": True})
    assert len(got) == len(want) == 3 and got[0].shape[0] == 100
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    boxes, scores = generate_proposals(*two, **direct)
    assert len(boxes) == len(scores) == 2  # one tensor per image
    settings = ProposalSettings.from_config(shapes().override(["rpn.post_nms_train=123", "rpn.post_nms_test=45"]))
    assert (settings.post_nms_train, settings.post_nms_test) == (123, 45)


def test_top_per_group_keeps_score_order_in_long_runs_of_ties():
    # thousands of items in three groups: an unstable sort (torch's default) reorders ties at this size
    groups = torch.randint(0, 3, (5000,), generator=torch.Generator().manual_seed(0))
    expected = [i for g in range(3) for i in [j for j, v in enumerate(groups.tolist()) if v == g][:700]]
    assert top_per_group(groups, 700).tolist() == expected

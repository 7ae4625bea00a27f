from __future__ import annotations

import torch

from mrcnn.box_coder import encode
from mrcnn.detection_targets import sample_detection_targets

GT = torch.tensor([[16.0, 20.0, 52.0, 56.0], [60.0, 60.0, 100.0, 90.0]])
FAR = torch.tensor([[0.0, 100.0, 10.0, 110.0], [110.0, 0.0, 120.0, 12.0], [100.0, 110.0, 120.0, 127.0]])


def _batch(gt=GT, classes=(1, 2), crowd=None, slots=4, mini=56):
    gt_boxes = torch.zeros(1, slots, 4)
    gt_class_ids = torch.zeros(1, slots, dtype=torch.int64)
    gt_boxes[0, : len(gt)] = gt
    gt_class_ids[0, : len(classes)] = torch.tensor(classes, dtype=torch.int64)
    crowd_boxes = torch.zeros(1, 2, 4)
    if crowd is not None:
        crowd_boxes[0, 0] = torch.tensor(crowd)
    return {
        "gt_class_ids": gt_class_ids,
        "gt_boxes": gt_boxes,
        "gt_mini_masks": torch.ones(1, slots, mini, mini, dtype=torch.uint8),
        "crowd_boxes": crowd_boxes,
    }


def _jitter(box: torch.Tensor, count: int) -> torch.Tensor:
    """`count` boxes shifted by 0..2 px: IoU with `box` well above 0.5."""
    shifts = torch.arange(count, dtype=torch.float32).remainder(3).unsqueeze(1)
    return box + torch.cat([shifts, -shifts, shifts, -shifts], dim=1) * 0.5


def _sample(proposals, batch, **kwargs):
    settings = {"rois_per_image": 8, "positive_fraction": 0.25, "positive_iou": 0.5, "crowd_iou": 0.001,
                "bbox_std": (0.1, 0.1, 0.2, 0.2), "mask_size": 28}
    settings.update(kwargs)
    return sample_detection_targets(proposals, **batch, generator=torch.Generator().manual_seed(0), **settings)


def test_sample_size_ratio_classes_and_deltas():
    proposals = torch.cat([_jitter(GT[0], 10), _jitter(GT[1], 10), FAR.repeat(4, 1)])
    t = _sample([proposals], _batch())
    assert t.rois.shape == (8, 4) and t.image_idx.tolist() == [0] * 8
    assert (t.class_ids > 0).sum().item() == 2  # int(8 * 0.25), positives first
    assert (t.class_ids[2:] == 0).all()
    pos = t.rois[:2]
    matched = GT[t.class_ids[:2] - 1]  # class 1 <-> GT[0], class 2 <-> GT[1] here
    torch.testing.assert_close(t.deltas[:2], encode(matched, pos, std=(0.1, 0.1, 0.2, 0.2)))
    assert (t.deltas[2:] == 0).all() and t.masks.shape == (2, 28, 28)
    assert t.rois_with_index().shape == (8, 5)


def test_gt_boxes_are_appended_and_negatives_fill_the_sample():
    t = _sample([FAR], _batch(), positive_fraction=0.5)
    # the only positives are the two gt boxes themselves (zero deltas); all three far boxes are negatives
    assert sorted(t.class_ids.tolist()) == [0, 0, 0, 1, 2]
    positives = t.rois[t.class_ids > 0]
    assert sorted(map(tuple, positives.tolist())) == sorted(map(tuple, GT.tolist()))
    torch.testing.assert_close(t.deltas, torch.zeros(5, 4))
    # a full mini-mask and a RoI equal to its box: all ones, but for the bilinear fade-out at the box edge
    # (half a mini-mask cell wide: a quarter of a 28-grid cell)
    assert t.masks.shape == (2, 28, 28) and t.masks[:, 1:-1, 1:-1].min().item() > 0.99
    assert t.masks.min().item() > 0.75


def test_mask_target_of_a_shifted_roi():
    # RoI = the gt box shifted left by half its width: the left half of the target lies outside the mask
    roi = GT[:1] - torch.tensor([[18.0, 0.0, 18.0, 0.0]])
    t = _sample([roi], _batch(gt=GT[:1], classes=(1,)), rois_per_image=2, positive_fraction=1.0, positive_iou=0.3)
    shifted = t.masks[(t.rois - roi).abs().sum(1)[t.class_ids > 0] == 0][0]
    assert shifted[:, :13].max().item() < 0.01 and shifted[:, 15:].min().item() > 0.99


def test_crowd_overlaps_are_never_negative():
    crowd = [100.0, 100.0, 128.0, 128.0]
    t = _sample([FAR], _batch(crowd=crowd), rois_per_image=16)
    # FAR[2] touches the crowd box (IoU > 0.001): neither positive nor negative
    assert t.rois.shape[0] == 4 and not any(torch.equal(r, FAR[2]) for r in t.rois)


def test_image_without_instances_gives_only_negatives():
    batch = _batch(gt=torch.zeros(0, 4), classes=())
    t = _sample([torch.cat([FAR, _jitter(GT[0], 3)])], batch, rois_per_image=4)
    assert t.class_ids.tolist() == [0, 0, 0, 0] and t.masks.shape == (0, 28, 28)
    assert (t.deltas == 0).all()


def test_batch_of_two_images_keeps_images_apart():
    batch = _batch()
    two = {k: torch.cat([v, v]) for k, v in batch.items()}
    two["gt_class_ids"][1] = 0  # second image: no instances
    t = _sample([FAR, FAR[:2]], two)
    assert t.image_idx.tolist() == [0] * 5 + [1] * 2
    assert t.class_ids[5:].tolist() == [0, 0] and (t.class_ids[:5] > 0).sum().item() == 2


def test_a_roi_exactly_at_positive_iou_is_positive():
    # GT[0] is 36 x 36; the RoI holds it and is twice its area (36 x 72): IoU exactly 0.5
    at_threshold = torch.tensor([[16.0, 20.0, 52.0, 92.0]])
    t = _sample([at_threshold], _batch(gt=GT[:1], classes=(1,)), rois_per_image=4, positive_fraction=1.0)
    assert sorted(t.class_ids.tolist()) == [1, 1]  # the RoI and the appended gt box
    # a positive threshold just above 0.5 makes it a negative
    t = _sample([at_threshold], _batch(gt=GT[:1], classes=(1,)), rois_per_image=4, positive_fraction=1.0,
                positive_iou=0.51)
    assert t.class_ids.tolist() == [1, 0] and torch.equal(t.rois[1], at_threshold[0])


def test_a_roi_exactly_at_crowd_iou_is_never_negative():
    crowd = [100.0, 100.0, 110.0, 110.0]
    at_threshold = torch.tensor([[100.0, 100.0, 110.0, 120.0]])  # IoU with the crowd box exactly 0.5
    t = _sample([at_threshold], _batch(crowd=crowd), rois_per_image=8, crowd_iou=0.5)
    assert not any(torch.equal(r, at_threshold[0]) for r in t.rois)
    t = _sample([at_threshold], _batch(crowd=crowd), rois_per_image=8, crowd_iou=0.51)
    assert any(torch.equal(r, at_threshold[0]) for r in t.rois)


def test_settings_reach_sample_detection_targets():
    from mrcnn.config import shapes
    from mrcnn.detection_targets import DetectionTargetSettings

    crowd = [100.0, 100.0, 110.0, 110.0]
    proposals = torch.cat([_jitter(GT[0], 6), torch.tensor([[16.0, 20.0, 52.0, 92.0]]), FAR.repeat(3, 1),
                           torch.tensor([[100.0, 100.0, 110.0, 120.0]])])  # IoU 0.5 with GT[0]; 0.5 with the crowd

    def run(*overrides):
        config = shapes().override(["roi.rois_per_image=8", "roi.positive_fraction=0.25", "roi.positive_iou=0.5",
                                    "rpn.crowd_iou=0.001", "roi.bbox_std=[0.1,0.1,0.2,0.2]", "mask.mask_size=28",
                                    *overrides])
        t = DetectionTargetSettings.from_config(config).sample([proposals], **_batch(crowd=crowd),
                                                               generator=torch.Generator().manual_seed(0))
        return t.rois.shape[0], int((t.class_ids > 0).sum()), tuple(t.masks.shape[1:]), t

    assert run()[:3] == (8, 2, (28, 28))
    assert run("roi.rois_per_image=4")[:2] == (4, 1)
    assert run("roi.positive_fraction=0.5")[:2] == (8, 4)
    assert run("mask.mask_size=14")[2] == (14, 14)
    # 9 positives at 0.5 (6 jittered, the 0.5 RoI, 2 gt boxes); at 0.6 the 0.5 RoI is not one, and fills as negative
    everything = ["roi.rois_per_image=32", "roi.positive_fraction=1.0"]
    assert run(*everything)[1] == 9 and run(*everything, "roi.positive_iou=0.6")[1] == 8
    # the crowd threshold comes from the rpn section: at 0.6 the RoI half over the crowd box becomes a negative
    assert run(*everything)[0] == 9 + 9 and run(*everything, "rpn.crowd_iou=0.6")[0] == 9 + 10
    # same sample (same generator), the deltas divided by twice the std: half of them
    base, doubled = run(*everything)[3], run(*everything, "roi.bbox_std=[0.2,0.2,0.4,0.4]")[3]
    assert base.deltas.abs().sum() > 0
    torch.testing.assert_close(doubled.deltas * 2, base.deltas)


def test_nonempty_boxes_needs_positive_width_and_height():
    from mrcnn.detection_targets import nonempty_boxes

    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # a box
        [5.0, 0.0, 5.0, 10.0],  # zero width
        [0.0, 5.0, 10.0, 5.0],  # zero height
        [0.0, 0.0, 0.0, 0.0],  # padding
        [20.0, 0.0, 30.0, 10.0],  # right of the origin: x1 > y2
        [0.0, 20.0, 10.0, 30.0],  # below it: y1 > x2
        [10.0, 0.0, 5.0, 10.0],  # x2 < x1
    ])
    assert nonempty_boxes(boxes).tolist() == [True, False, False, False, True, True, False]

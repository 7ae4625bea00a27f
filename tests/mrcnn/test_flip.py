import pytest
import torch

from mrcnn.anchors import AnchorSettings, flip_permutation, generate_anchors
from mrcnn.flip import flip_batch
from mrcnn.mini_masks import mini_mask_boxes, minimize_masks
from mrcnn.rpn_targets import compute_rpn_targets, dense_rpn_targets

S = 64
# ratios 1/4, 1, 4 keep every anchor coordinate a multiple of 1/2, so mirrored IoUs are bit-identical and the
# best-anchor ties come out the same on both sides
ANCHORS = AnchorSettings(image_size=S, scales=(8, 16, 32), feature_strides=(4, 8, 16), ratios=(0.25, 1.0, 4.0),
                         anchor_stride=1, offset=0.5, round_sizes=False)
RPN_RULES = dict(positive_iou=0.7, negative_iou=0.3, crowd_iou=0.001, bbox_std=(0.1, 0.1, 0.2, 0.2))


def _mirror(boxes):
    return torch.stack([S - boxes[..., 2], boxes[..., 1], S - boxes[..., 0], boxes[..., 3]], dim=-1)


def _random_boxes(n, g, max_size=40):
    xy = torch.randint(0, S - 8, (n, 2), generator=g)
    wh = torch.randint(2, max_size, (n, 2), generator=g)
    return torch.cat([xy, (xy + wh).clamp(max=S)], dim=1).float()


def _dense(anchors, gt, crowd):
    t = compute_rpn_targets(anchors=anchors, gt_boxes=gt, crowd_boxes=crowd, **RPN_RULES)
    return dense_rpn_targets(anchors.shape[0], t.pos_idx, t.pos_deltas, t.ignore_idx)


@pytest.mark.parametrize("seed", range(10))
def test_permuted_targets_equal_targets_of_the_mirrored_boxes(seed):
    g = torch.Generator().manual_seed(seed)
    anchors = generate_anchors(ANCHORS)
    perm = flip_permutation(ANCHORS)
    gt = _random_boxes(int(torch.randint(1, 8, (1,), generator=g)), g)
    crowd = _random_boxes(int(torch.randint(0, 3, (1,), generator=g)), g, max_size=10)
    match, deltas = _dense(anchors, gt, crowd)
    flipped = flip_batch(
        {"images": torch.zeros(1, 3, S, S, dtype=torch.uint8), "rpn_match": match[None], "rpn_deltas": deltas[None]},
        flip_perm=perm,
        which=torch.tensor([True]),
    )
    match_m, deltas_m = _dense(anchors, _mirror(gt), _mirror(crowd))
    assert (match_m == 1).any()
    assert torch.equal(flipped["rpn_match"][0], match_m)
    torch.testing.assert_close(flipped["rpn_deltas"][0], deltas_m, rtol=0, atol=1e-6)


def _image_and_targets(boxes, class_ids, crowd, full_masks, window, anchors, mini_size=14):
    """One image's batch entries built from scratch, the way the preprocess stage and loader build them."""
    real = class_ids > 0
    mini = torch.zeros(len(class_ids), mini_size, mini_size, dtype=torch.uint8)
    mini[real] = minimize_masks(full_masks, mini_mask_boxes(boxes[real]), size=mini_size).to(torch.uint8)
    match, deltas = _dense(anchors, boxes[real], crowd[(crowd != 0).any(-1)])
    return dict(
        gt_boxes=boxes,
        gt_class_ids=class_ids,
        crowd_boxes=crowd,
        gt_mini_masks=mini,
        windows=window,
        rpn_match=match,
        rpn_deltas=deltas,
    )


def _rect_mask(box):
    mask = torch.zeros(S, S, dtype=torch.bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    mask[y1:y2, x1:x2] = True
    mask[y1 : (y1 + y2) // 2, x1 : (x1 + x2) // 2] = False  # a notch, so left and right differ
    return mask


def test_flip_batch_equals_targets_recomputed_on_the_flipped_image():
    g = torch.Generator().manual_seed(0)
    anchors = generate_anchors(ANCHORS)
    perm = flip_permutation(ANCHORS)
    entries, flipped_entries, images = [], [], []
    for n_gt in (3, 2):
        boxes = torch.zeros(4, 4)  # G = 4 with padding rows
        boxes[:n_gt] = _random_boxes(n_gt, g)
        class_ids = torch.tensor([1 + i if i < n_gt else 0 for i in range(4)])
        crowd = torch.zeros(2, 4)  # C = 2, first row real, second padding
        crowd[0] = torch.tensor([1.0, 40.0, 9.0, 50.0])
        window = torch.tensor([0, 0, 48, 64])  # a portrait image at the top-left
        masks = torch.stack([_rect_mask(b) for b in boxes[:n_gt]])
        image = torch.randint(0, 256, (3, S, S), generator=g, dtype=torch.uint8)
        image[:, :, 48:] = 0  # padding right of the window
        images.append(image)
        entries.append(_image_and_targets(boxes, class_ids, crowd, masks, window, anchors))
        # the same image flipped, and every target recomputed from the flipped boxes and masks
        real = class_ids > 0
        m_boxes = boxes.clone()
        m_boxes[real] = _mirror(boxes[real])
        m_crowd = crowd.clone()
        m_crowd[0] = _mirror(crowd[0])
        m_window = torch.tensor([S - 48, 0, S, 64])
        flipped_entries.append(
            _image_and_targets(m_boxes, class_ids, m_crowd, masks.flip(-1), m_window, anchors)
            | {"image": image.flip(-1)}
        )

    def stack(items, key):
        return torch.stack([e[key] for e in items])

    keys = ["gt_boxes", "gt_class_ids", "crowd_boxes", "gt_mini_masks", "windows", "rpn_match", "rpn_deltas"]
    batch = {k: stack(entries, k) for k in keys}
    batch |= {"images": torch.stack(images), "image_ids": torch.tensor([7, 9]), "scales": torch.tensor([1.0, 1.0])}
    original = {k: v.clone() for k, v in batch.items()}

    out = flip_batch(batch, flip_perm=perm, which=torch.tensor([True, False]))

    # image 0 is flipped and every target equals its recomputation
    expected = flipped_entries[0]
    assert torch.equal(out["images"][0], expected["image"])
    for key in keys:
        assert torch.equal(out[key][0], expected[key]), key
    # image 1 and the pass-through keys are untouched, and the input batch was not modified
    for key in [*keys, "images"]:
        assert torch.equal(out[key][1], original[key][1]), key
    assert out["image_ids"] is batch["image_ids"] and out["scales"] is batch["scales"]
    for key, value in original.items():
        assert torch.equal(batch[key], value), key
    # padding stays zero
    assert (out["gt_boxes"][0, 3] == 0).all() and (out["crowd_boxes"][0, 1] == 0).all()


def test_flipping_twice_is_the_identity_and_which_false_is_a_no_op():
    g = torch.Generator().manual_seed(3)
    anchors = generate_anchors(ANCHORS)
    perm = flip_permutation(ANCHORS)
    match, deltas = _dense(anchors, _random_boxes(3, g), torch.zeros(0, 4))
    batch = {
        "images": torch.randint(0, 256, (2, 3, S, S), generator=g, dtype=torch.uint8),
        "gt_boxes": _random_boxes(2, g)[None].repeat(2, 1, 1),
        "gt_class_ids": torch.tensor([[1, 2], [3, 0]]),
        "rpn_match": match[None].repeat(2, 1),
        "rpn_deltas": deltas[None].repeat(2, 1, 1),
    }
    which = torch.tensor([True, True])
    twice = flip_batch(flip_batch(batch, flip_perm=perm, which=which), flip_perm=perm, which=which)
    for key, value in batch.items():
        assert torch.equal(twice[key], value), key
    none = flip_batch(batch, flip_perm=perm, which=torch.tensor([False, False]))
    for key, value in batch.items():
        assert torch.equal(none[key], value), key


def _wide_batch():
    """Two images of 4 x 6 (not square: the mirror is about the width), no gt_class_ids (padding rows all zero),
    int64 windows, dense RPN deltas without labels."""
    return {"images": torch.arange(2 * 3 * 4 * 6, dtype=torch.uint8).reshape(2, 3, 4, 6),
            "gt_boxes": torch.tensor([[[1.0, 0.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]],
                                      [[2.0, 1.0, 5.0, 4.0], [0.0, 0.0, 0.0, 0.0]]]),
            "windows": torch.tensor([[0, 0, 6, 4], [0, 0, 5, 3]]),
            "rpn_deltas": torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)}


def test_flip_batch_by_hand_on_a_wide_batch_without_class_ids():
    batch = _wide_batch()
    out = flip_batch(batch, flip_perm=torch.tensor([2, 1, 0]), which=torch.tensor([False, True]))
    assert torch.equal(out["images"][0], batch["images"][0])
    assert torch.equal(out["images"][1], batch["images"][1].flip(-1))
    assert torch.equal(out["gt_boxes"][0], batch["gt_boxes"][0])
    assert out["gt_boxes"][1].tolist() == [[1.0, 1.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0]]  # 6 - 5, 6 - 2; padding stays
    assert out["windows"].dtype == torch.int64 and out["windows"].tolist() == [[0, 0, 6, 4], [1, 0, 6, 3]]
    expected = batch["rpn_deltas"].clone()
    expected[1] = batch["rpn_deltas"][1][[2, 1, 0]] * torch.tensor([-1.0, 1.0, 1.0, 1.0])
    assert torch.equal(out["rpn_deltas"], expected)


def test_flip_batch_with_nothing_chosen_hands_back_the_same_tensors():
    batch = _wide_batch()
    out = flip_batch(batch, flip_perm=torch.tensor([2, 1, 0]), which=torch.tensor([False, False]))
    assert out is not batch and all(out[key] is batch[key] for key in batch)  # no copy, no device work

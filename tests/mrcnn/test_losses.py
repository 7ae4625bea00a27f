from __future__ import annotations

import math

import pytest
import torch

from mrcnn.losses import box_losses, mask_loss, rpn_losses

SAMPLE = {"num_samples": 256, "positive_fraction": 0.5}  # the coco preset's anchor sample


def _smooth_l1(x: float, beta: float = 1 / 9) -> float:
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


def test_rpn_losses_known_answer():
    match = torch.tensor([[1, 0, 0, -1, 1, 0]], dtype=torch.int8)
    targets = torch.zeros(1, 6, 4)
    targets[0, 0] = torch.tensor([0.1, 0.0, 0.0, 0.0])
    targets[0, 4] = torch.tensor([0.0, 0.0, 2.0, 0.0])
    pred = torch.zeros(1, 6, 4)
    pred[0, 1] = 50.0  # a negative's deltas never count
    logits = torch.zeros(1, 6)
    logits[0, 3] = 100.0  # an ignored anchor's logit never counts
    loss_cls, loss_box = rpn_losses(logits, pred, match, targets, num_samples=256, positive_fraction=0.5)
    # 5 sampled anchors (2 positive, 3 negative), all at logit 0: BCE = log 2 each
    assert loss_cls.item() == pytest.approx(math.log(2))
    assert loss_box.item() == pytest.approx((_smooth_l1(0.1) + _smooth_l1(2.0)) / 5)


def test_box_losses_use_the_gt_class_deltas_of_positives_only():
    logits = torch.zeros(3, 3)
    pred = torch.full((3, 3, 4), 9.0)  # other classes' deltas are wild and must not count
    targets = torch.tensor([[0.5, 0.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0], [0.0, 0.0, 0.0, 0.0]])
    pred[0, 2] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # exact
    pred[2, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # off by 1 in dx
    loss_cls, loss_box = box_losses(logits, pred, torch.tensor([2, 0, 1]), targets)
    assert loss_cls.item() == pytest.approx(math.log(3))
    assert loss_box.item() == pytest.approx(_smooth_l1(1.0) / 3)  # divided by all sampled RoIs


def test_mask_loss_uses_the_gt_class_channel():
    logits = torch.full((2, 3, 4, 4), -30.0)
    logits[0, 2] = 0.0  # BCE log 2 against any target
    logits[1, 1] = 30.0  # confident and right: ~0
    targets = torch.stack([torch.rand(4, 4), torch.ones(4, 4)])
    loss = mask_loss(logits, torch.tensor([2, 1]), targets)
    assert loss.item() == pytest.approx(math.log(2) / 2, rel=1e-5)


def test_nothing_to_learn_gives_zero_not_nan_and_keeps_the_graph():
    logits = torch.zeros(0, 3, requires_grad=True)
    pred = torch.zeros(0, 3, 4, requires_grad=True)
    loss_cls, loss_box = box_losses(logits, pred, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    masks = torch.zeros(0, 3, 28, 28, requires_grad=True)
    loss_m = mask_loss(masks, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 28, 28))
    for loss in (loss_cls, loss_box, loss_m):
        assert loss.item() == 0.0 and loss.requires_grad
    # only negatives: zero box loss, finite classification loss
    match = torch.zeros(1, 4, dtype=torch.int8)
    rpn_cls, rpn_box = rpn_losses(torch.zeros(1, 4), torch.ones(1, 4, 4), match, torch.zeros(1, 4, 4), **SAMPLE)
    assert rpn_box.item() == 0.0 and rpn_cls.item() == pytest.approx(math.log(2))
    all_ignored = torch.full((1, 4), -1, dtype=torch.int8)
    rpn_cls, rpn_box = rpn_losses(torch.zeros(1, 4), torch.ones(1, 4, 4), all_ignored, torch.zeros(1, 4, 4), **SAMPLE)
    assert rpn_cls.item() == 0.0 and rpn_box.item() == 0.0


def test_losses_are_float32_under_bf16_inputs():
    logits = torch.zeros(2, 3, dtype=torch.bfloat16)
    pred = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    loss_cls, loss_box = box_losses(logits, pred, torch.tensor([1, 0]), torch.zeros(2, 4))
    assert loss_cls.dtype == loss_box.dtype == torch.float32


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_rpn_classification_loss_knows_positive_from_negative():
    # non-zero logits: with labels swapped (or all read as one sign) the value changes
    match = torch.tensor([[1, 0, 0, -1, 1, 0]], dtype=torch.int8)
    logits = torch.tensor([[2.0, -1.0, 0.5, 100.0, -3.0, 1.0]])
    loss_cls, _ = rpn_losses(logits, torch.zeros(1, 6, 4), match, torch.zeros(1, 6, 4), **SAMPLE)
    # positive at logit x: -log sigmoid(x) = softplus(-x); negative: -log(1 - sigmoid(x)) = softplus(x)
    expected = (_softplus(-2.0) + _softplus(3.0) + _softplus(-1.0) + _softplus(0.5) + _softplus(1.0)) / 5
    assert loss_cls.item() == pytest.approx(expected, rel=1e-6)


def test_rpn_sample_settings_reach_the_losses():
    from mrcnn.config import shapes
    from mrcnn.losses import RPNSampleSettings

    # 4 positives at logit -2 (each softplus(2)), 12 negatives at logit -2 (each softplus(-2))
    match = torch.tensor([[1] * 4 + [0] * 12], dtype=torch.int8)
    logits = torch.full((1, 16), -2.0)

    def loss(num, fraction):
        config = shapes().override([f"rpn.anchors_per_image={num}", f"rpn.positive_fraction={fraction}"])
        settings = RPNSampleSettings.from_config(config)
        return settings.losses(logits, torch.zeros(1, 16, 4), match, torch.zeros(1, 16, 4))[0].item()

    def expected(pos, neg):
        return (pos * _softplus(2.0) + neg * _softplus(-2.0)) / (pos + neg)

    assert loss(8, 0.5) == pytest.approx(expected(4, 4))
    assert loss(8, 0.25) == pytest.approx(expected(2, 6))
    assert loss(4, 0.5) == pytest.approx(expected(2, 2))
    assert loss(4, 0.25) == pytest.approx(expected(1, 3))


def test_box_classification_loss_with_non_zero_logits_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    loss_cls, _ = box_losses(logits, torch.zeros(2, 3, 4), torch.tensor([0, 2]), torch.zeros(2, 4))

    def nll(row, k):
        return -row[k] + math.log(sum(math.exp(v) for v in row))

    rows = logits.tolist()
    assert loss_cls.item() == pytest.approx((nll(rows[0], 0) + nll(rows[1], 2)) / 2, rel=1e-6)


def test_mask_loss_with_non_zero_logits_by_hand():
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0] = torch.tensor([1.5, -0.5])
    loss = mask_loss(logits, torch.tensor([1]), torch.tensor([[[1.0, 0.0]]]))
    assert loss.item() == pytest.approx((_softplus(-1.5) + _softplus(-0.5)) / 2, rel=1e-6)


def test_rpn_losses_sample_with_the_given_generator():
    # 8 positives and 8 negatives with distinct logits, 4 sampled: the loss depends on the draw, and the same
    # seed gives the same draw
    match = torch.tensor([[1] * 8 + [0] * 8], dtype=torch.int8)
    logits = torch.linspace(-3, 3, 16)[None]

    def loss(seed):
        return rpn_losses(logits, torch.zeros(1, 16, 4), match, torch.zeros(1, 16, 4), num_samples=4,
                          positive_fraction=0.5, generator=torch.Generator().manual_seed(seed))[0].item()

    values = {loss(seed) for seed in range(6)}
    assert len(values) > 1
    assert all(loss(seed) == loss(seed) for seed in range(3))
    torch.manual_seed(0)  # the global generator moved between the calls: a seeded draw must not follow it
    first = loss(7)
    torch.manual_seed(1)
    assert loss(7) == first


def test_rpn_losses_of_a_single_sampled_anchor_divide_by_one():
    match = torch.tensor([[1, -1]], dtype=torch.int8)
    targets = torch.zeros(1, 2, 4)
    targets[0, 0, 0] = 2.0
    loss_cls, loss_box = rpn_losses(torch.zeros(1, 2), torch.zeros(1, 2, 4), match, targets, **SAMPLE)
    assert loss_cls.item() == pytest.approx(math.log(2)) and loss_box.item() == pytest.approx(_smooth_l1(2.0))

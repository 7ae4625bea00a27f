"""torchvision's Mask R-CNN weights in our model: converted, they give its outputs at the `torchvision` preset.

The reference is torchvision's own `maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`, seeded, with its
BatchNorm2d layers made the FrozenBatchNorm2d(eps=0) that `maskrcnn_resnet50_fpn(weights=COCO_V1)` runs. Both models
see the same normalised input tensor: ours normalises the uint8 canvas, and that very tensor goes into torchvision's
backbone, RPN and RoI heads (its GeneralizedRCNNTransform, which would resize, is bypassed).

Why the comparison is not degenerate (each is asserted, not assumed):
- the inputs are two different textured images, the second 320 x 224 inside the 320 x 320 canvas (window clipping,
  zero padding, two images in one batch against torchvision's per-image loops);
- the BatchNorm statistics are random, a tenth of the channels with variances of 1e-4..1e-3 (their weights scaled
  alike), where eps 1e-5 against torchvision's 0 changes the output by up to 5% (so `backbone.frozen_bn_eps` matters);
- the head weights are redrawn wider than torchvision's initialisation: objectness logits spread over several units
  (hundreds of distinct proposal scores), deltas move the boxes off their anchors, class logits let several classes
  pass the 0.05 threshold (thousands of candidates, the 100 best kept after NMS, of several classes), mask logits
  spread the probabilities.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from mrcnn.config import torchvision_maskrcnn
from mrcnn.model import build_model
from mrcnn.torchvision_weights import (
    CLASS_SPECIFIC,
    TORCHVISION_NUM_CLASSES,
    WeightsFormatError,
    convert_state,
    load_torchvision_state,
)
from tests.support.torchvision_reference import sample_images, torchvision_reference

torch.set_num_threads(1)  # shared 2-core machine: one thread avoids OpenMP contention

SIZE = 320
WINDOWS = ((0, 0, SIZE, SIZE), (0, 0, SIZE, 224))  # (x1, y1, x2, y2): the second image is 320 wide, 224 high
CONFIG = torchvision_maskrcnn().override([f"image.min_dim={SIZE}", f"image.max_dim={SIZE}"])


def converted_model(reference: nn.Module, config=CONFIG):
    torch.manual_seed(123)  # a fresh initialisation unrelated to the reference's
    model = build_model(config, num_classes=TORCHVISION_NUM_CLASSES)
    report = load_torchvision_state(model, reference.state_dict(), class_rows=range(TORCHVISION_NUM_CLASSES))
    return model.eval(), report


@pytest.fixture(scope="module")
def outputs():
    """Both models' intermediate and final outputs on the same input (computed once: ResNet-50 on CPU)."""
    reference = torchvision_reference()
    ours, report = converted_model(reference)
    images, windows = sample_images(SIZE, WINDOWS), torch.tensor(WINDOWS)
    with torch.no_grad():
        x = ours.normalize(images)  # the one normalised tensor both models see
        image_sizes = [(int(w[3]), int(w[2])) for w in windows]  # torchvision's (height, width)
        features = reference.backbone(x)
        logits, deltas = reference.rpn.head(list(features.values()))
        tv_objectness, tv_deltas = concat_box_prediction_layers(logits, deltas)
        tv_proposals, _ = reference.rpn(ImageList(x, image_sizes), features)
        tv_detections, _ = reference.roi_heads(features, tv_proposals, image_sizes)

        pyramid, objectness, rpn_deltas = ours.features(images)
        settings = ours.proposal_settings
        proposals, proposal_scores = settings.propose(objectness, rpn_deltas, ours.anchors, windows,
                                                      post_nms_topk=settings.post_nms_test)
        detections = ours({"images": images, "windows": windows})
    return {
        "report": report,
        "tv": {"pyramid": list(features.values()), "objectness": tv_objectness.view(2, -1),
               "deltas": tv_deltas.view(2, -1, 4), "proposals": tv_proposals, "detections": tv_detections},
        "ours": {"pyramid": pyramid, "objectness": objectness, "deltas": rpn_deltas, "proposals": proposals,
                 "proposal_scores": proposal_scores, "detections": detections},
    }


def in_score_order(scores: torch.Tensor, *columns: torch.Tensor) -> torch.Tensor:
    """The permutation sorting rows by decreasing score, ties by the columns (e.g. box coordinates): both models sort
    by score, and the order among equal scores is their sort kernels' (float32 probabilities tie near 1)."""
    keys = [c.double().numpy() for c in reversed(columns)] + [-scores.double().numpy()]
    return torch.from_numpy(np.lexsort(keys))


def test_every_tensor_is_converted(outputs):
    report = outputs["report"]
    assert report.format == "maskrcnn" and not report.reinitialised and not report.fresh and not report.skipped
    assert len(report.loaded) == 307  # every tensor of the frozen reference


def test_pyramid_and_rpn_outputs_agree(outputs):
    tv, ours = outputs["tv"], outputs["ours"]
    for theirs, mine in zip(tv["pyramid"], ours["pyramid"], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["objectness"], tv["objectness"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["deltas"], tv["deltas"], rtol=1e-5, atol=1e-5)
    assert ours["objectness"].std() > 1.0  # logits spread over units, not all near 0


def test_proposals_agree(outputs):
    tv, ours = outputs["tv"], outputs["ours"]
    for theirs, mine, scores in zip(tv["proposals"], ours["proposals"], ours["proposal_scores"], strict=True):
        assert mine.shape == theirs.shape == (1000, 4)
        # position by position, rows of equal score (the same at both, else the next line fails) put in box order
        mine, theirs = mine[in_score_order(scores, *mine.T)], theirs[in_score_order(scores, *theirs.T)]
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-4)
        assert len(torch.unique(scores)) > 900  # distinct scores: the order is meaningful


def test_detections_and_masks_agree(outputs):
    tv, ours = outputs["tv"], outputs["ours"]
    for theirs, mine, window in zip(tv["detections"], ours["detections"], WINDOWS, strict=True):
        assert len(mine["boxes"]) == len(theirs["boxes"])
        # many detections (NMS at work: the 100 best of thousands above 0.05), of several classes
        assert len(theirs["boxes"]) == 100 and len(torch.unique(theirs["labels"])) >= 3
        order = in_score_order(mine["scores"], mine["class_ids"], *mine["boxes"].T)
        theirs_order = in_score_order(mine["scores"], theirs["labels"], *theirs["boxes"].T)
        assert torch.equal(mine["class_ids"][order], theirs["labels"][theirs_order])
        torch.testing.assert_close(mine["boxes"][order], theirs["boxes"][theirs_order], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(mine["scores"], theirs["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine["masks"][order], theirs["masks"][theirs_order, 0], rtol=1e-5, atol=1e-5)
        assert theirs["masks"].std() > 0.1  # probabilities spread over (0, 1)
        assert theirs["boxes"][:, 3].max() <= window[3]  # clipped to each image's own window


def test_old_torchvision_key_names_convert_the_same():
    """The COCO v1 file (2019) names layers as torchvision did then: `backbone.fpn.inner_blocks.0.weight`,
    `rpn.head.conv.weight`, `roi_heads.mask_head.mask_fcn1.weight`; they convert to the same tensors."""
    state = torchvision_reference().state_dict()
    old = {}
    for key, value in state.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                key = key.replace(f"backbone.fpn.{block}.{i}.0.", f"backbone.fpn.{block}.{i}.")
        for i in range(4):
            key = key.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        old[key] = value
    assert set(old) != set(state)
    rows = range(TORCHVISION_NUM_CLASSES)
    _, new_names, _ = convert_state(state, class_rows=rows)
    _, old_names, _ = convert_state(old, class_rows=rows)
    assert new_names.keys() == old_names.keys()
    assert all(torch.equal(new_names[k], old_names[k]) for k in new_names)


def test_each_torchvision_setting_matters(outputs):
    """The preset is needed as a whole: dropping any one of its conventions changes the outputs."""
    reference = torchvision_reference()
    images, windows = sample_images(SIZE, WINDOWS)[:1], torch.tensor(WINDOWS[:1])
    baseline = outputs["ours"]
    for override in ["backbone.frozen_bn_eps=1.0e-5", "rpn.anchor_offset=0.5", "rpn.round_anchors=false",
                     "rpn.bbox_std=[0.1, 0.1, 0.2, 0.2]", "rpn.pre_nms_per_level=false", "rpn.nms_per_level=false",
                     "roi.aligned=true"]:
        model, _ = converted_model(reference, CONFIG.override([override]))
        with torch.no_grad():
            if override.startswith("backbone"):
                changed = model.features(images)[1]
                assert not torch.allclose(changed, baseline["objectness"][:1], rtol=1e-5, atol=1e-5), override
                continue
            if override.startswith("rpn"):
                _, objectness, deltas = model.features(images)
                settings = model.proposal_settings
                boxes, _ = settings.propose(objectness, deltas, model.anchors, windows,
                                            post_nms_topk=settings.post_nms_test)
                same = boxes[0].shape == baseline["proposals"][0].shape and torch.allclose(
                    boxes[0], baseline["proposals"][0], atol=1e-3)
                assert not same, override
                continue
            detections = model({"images": images, "windows": windows})[0]
        theirs = baseline["detections"][0]
        same = detections["scores"].shape == theirs["scores"].shape and torch.allclose(
            detections["scores"], theirs["scores"], atol=1e-5)
        assert not same, override


def test_class_rows_pick_torchvisions_classes_and_other_counts_are_reinitialised():
    torch.manual_seed(0)
    state = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()  # with BatchNorm2d's counters
    _, converted, _ = convert_state(state, class_rows=[0, 1, 90])
    cls = state["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(converted["box_head.class_logits.weight"], cls[[0, 1, 90]])
    box = state["roi_heads.box_predictor.bbox_pred.weight"]
    assert torch.equal(converted["box_head.box_deltas.weight"], box[[0, 1, 2, 3, 4, 5, 6, 7, 360, 361, 362, 363]])
    mask = state["roi_heads.mask_predictor.mask_fcn_logits.bias"]
    assert torch.equal(converted["mask_head.predictor.bias"], mask[[0, 1, 90]])
    # a model of 5 classes from the 91 rows: only the class-specific layers keep their fresh initialisation
    torch.manual_seed(3)
    model = build_model(CONFIG, num_classes=5)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_torchvision_state(model, state, class_rows=range(TORCHVISION_NUM_CLASSES))
    assert sorted(report.reinitialised) == sorted(CLASS_SPECIFIC)
    _, expected, _ = convert_state(state, class_rows=None)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh[key] if key in CLASS_SPECIFIC else expected[key]), key
    # BatchNorm2d's num_batches_tracked has no place in our FrozenBatchNorm2d backbone
    assert len(report.skipped) == 53 and all(k.endswith("num_batches_tracked") for k in report.skipped)
    assert report.summary().startswith("301 tensors loaded, 6 re-initialised (class-specific: box_head.class_logits")
    assert "53 skipped (unused: backbone.bn1.num_batches_tracked" in report.summary()


def test_a_file_of_neither_format_is_refused_naming_its_keys():
    model = build_model(CONFIG, num_classes=3)
    with pytest.raises(WeightsFormatError, match=r"fits neither .* first keys encoder\.w, decoder\.b"):
        load_torchvision_state(model, {"encoder.w": torch.zeros(1), "decoder.b": torch.zeros(1)})
    state = torchvision_reference().state_dict()
    state["roi_heads.keypoint_head.0.weight"] = torch.zeros(1)  # another architecture's layer
    with pytest.raises(WeightsFormatError, match=r"fit no layer of ours: roi_heads\.keypoint_head\.0\.weight"):
        load_torchvision_state(model, state)
    del state["roi_heads.keypoint_head.0.weight"], state["backbone.fpn.layer_blocks.3.0.bias"]
    with pytest.raises(WeightsFormatError, match=r"missing fpn\.output\.3\.bias"):
        load_torchvision_state(model, state)


def test_an_imagenet_resnet_fills_the_backbone_only():
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None).state_dict()
    model = build_model(CONFIG, num_classes=3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_torchvision_state(model, resnet)
    assert report.format == "resnet" and not report.reinitialised
    counters = sorted(f"backbone.{k}" for k in resnet if "num_batches" in k)  # no place in FrozenBatchNorm2d
    assert sorted(report.skipped) == counters + ["fc.bias", "fc.weight"]
    assert len(report.loaded) == 265 and all(k.startswith("backbone.") for k in report.loaded)
    assert report.fresh and not any(k.startswith("backbone.") for k in report.fresh)
    for key, value in model.state_dict().items():
        expected = resnet[key.removeprefix("backbone.")] if key.startswith("backbone.") else fresh[key]
        assert torch.equal(value, expected), key
    assert "not in the file (fresh initialisation: fpn.lateral.0.weight" in report.summary()

import math
from dataclasses import replace

import pytest
import torch

from mrcnn.anchors import (
    AnchorSettings,
    anchors_from_config,
    anchors_per_level,
    flip_permutation,
    flip_permutation_from_config,
    generate_anchors,
)
from mrcnn.config import coco, shapes

R2 = math.sqrt(2.0)
TINY = AnchorSettings(image_size=8, scales=(4,), feature_strides=(4,), ratios=(0.5, 1.0, 2.0), anchor_stride=1,
                      offset=0.5, round_sizes=False)


def _settings(**kwargs) -> AnchorSettings:
    """Centred, unrounded anchors (the coco preset's convention)."""
    return AnchorSettings(**kwargs, offset=0.5, round_sizes=False)


def _anchor(cx, cy, ratio):
    # scale 4: ratio 0.5 -> w 2*sqrt2, h 4*sqrt2; ratio 1 -> 4 x 4; ratio 2 -> w 4*sqrt2, h 2*sqrt2
    half_w, half_h = {0.5: (R2, 2 * R2), 1.0: (2.0, 2.0), 2.0: (2 * R2, R2)}[ratio]
    return [cx - half_w, cy - half_h, cx + half_w, cy + half_h]


def test_tiny_map_written_out_by_hand():
    # 2 x 2 positions with centres at 2 and 6; order row, column, ratio
    expected = torch.tensor(
        [
            [2 - R2, 2 - 2 * R2, 2 + R2, 2 + 2 * R2],  # row 0, column 0, ratio 0.5
            [0.0, 0.0, 4.0, 4.0],  # ratio 1
            [2 - 2 * R2, 2 - R2, 2 + 2 * R2, 2 + R2],  # ratio 2
            [6 - R2, 2 - 2 * R2, 6 + R2, 2 + 2 * R2],  # row 0, column 1
            [4.0, 0.0, 8.0, 4.0],
            [6 - 2 * R2, 2 - R2, 6 + 2 * R2, 2 + R2],
            [2 - R2, 6 - 2 * R2, 2 + R2, 6 + 2 * R2],  # row 1, column 0
            [0.0, 4.0, 4.0, 8.0],
            [2 - 2 * R2, 6 - R2, 2 + 2 * R2, 6 + R2],
            [6 - R2, 6 - 2 * R2, 6 + R2, 6 + 2 * R2],  # row 1, column 1
            [4.0, 4.0, 8.0, 8.0],
            [6 - 2 * R2, 6 - R2, 6 + 2 * R2, 6 + R2],
        ]
    )
    anchors = generate_anchors(TINY)
    assert anchors.dtype == torch.float32
    torch.testing.assert_close(anchors, expected)
    # the helper above agrees with the literal table (so the mirror test below uses the same numbers)
    helper = [_anchor(cx, cy, r) for cy in (2, 6) for cx in (2, 6) for r in (0.5, 1.0, 2.0)]
    torch.testing.assert_close(anchors, torch.tensor(helper))


def test_anchor_stride_spreads_centres():
    # image 16, stride 4, anchor stride 2 -> step 8: 2 positions per side, centres at 4 and 12
    anchors = generate_anchors(_settings(image_size=16, scales=(8,), feature_strides=(4,), ratios=(1.0,),
                                         anchor_stride=2))
    expected = torch.tensor([[0.0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16], [8, 8, 16, 16]])
    torch.testing.assert_close(anchors, expected)


def test_partial_last_cell_counts_as_a_position():
    # image 10, step 4: ceil(10 / 4) = 3 positions per side
    tiny = _settings(image_size=10, scales=(4,), feature_strides=(4,), ratios=(1.0,), anchor_stride=1)
    assert anchors_per_level(tiny) == [9]


def test_coco_preset_counts():
    config = coco()
    assert anchors_from_config(config).shape == (65_472, 4)
    kwargs = dict(image_size=1024, scales=(32, 64, 128, 256, 512), feature_strides=(4, 8, 16, 32, 64))
    assert anchors_per_level(_settings(**kwargs, ratios=(0.5, 1, 2), anchor_stride=2)) == [49152, 12288, 3072, 768, 192]
    assert sum(anchors_per_level(_settings(**kwargs, ratios=(0.5, 1, 2), anchor_stride=1))) == 261_888


def test_levels_are_concatenated_p2_first():
    kwargs = dict(image_size=64, scales=(8, 16), feature_strides=(4, 8), ratios=(1.0,), anchor_stride=1)
    anchors = generate_anchors(_settings(**kwargs))
    assert anchors_per_level(_settings(**kwargs)) == [256, 64]
    torch.testing.assert_close(anchors[0], torch.tensor([-2.0, -2.0, 6.0, 6.0]))  # P2 centre (2, 2), 8 x 8
    torch.testing.assert_close(anchors[256], torch.tensor([-4.0, -4.0, 12.0, 12.0]))  # P3 centre (4, 4), 16 x 16


def test_scale_is_the_square_root_of_area_and_ratio_is_w_over_h():
    anchors = generate_anchors(TINY)
    w = anchors[:, 2] - anchors[:, 0]
    h = anchors[:, 3] - anchors[:, 1]
    torch.testing.assert_close(w * h, torch.full((12,), 16.0))
    torch.testing.assert_close(w / h, torch.tensor([0.5, 1.0, 2.0]).repeat(4))


def _mirror(boxes, size):
    return torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], dim=1)


@pytest.mark.parametrize("config", [coco(), shapes(), coco().override(["rpn.anchor_stride=1"])])
def test_flip_permutation_is_an_involution_mapping_each_anchor_to_its_mirror(config):
    anchors = anchors_from_config(config)
    perm = flip_permutation_from_config(config)
    assert perm.dtype == torch.int64 and perm.shape == (anchors.shape[0],)
    assert torch.equal(perm[perm], torch.arange(anchors.shape[0]))
    assert torch.equal(perm.sort().values, torch.arange(anchors.shape[0]))
    torch.testing.assert_close(anchors[perm], _mirror(anchors, config.image.max_dim), rtol=0, atol=1e-4)


def test_flip_permutation_tiny_by_hand():
    # columns swap within each row; ratio order is kept
    assert flip_permutation(TINY).tolist() == [3, 4, 5, 0, 1, 2, 9, 10, 11, 6, 7, 8]


def test_flip_permutation_refuses_asymmetric_layout():
    with pytest.raises(ValueError, match="mirror-symmetric"):
        flip_permutation(_settings(image_size=10, scales=(4,), feature_strides=(4,), ratios=(1.0,), anchor_stride=1))


def test_one_scale_per_level_is_required():
    with pytest.raises(ValueError, match="one anchor scale per level"):
        generate_anchors(_settings(image_size=8, scales=(4, 8), feature_strides=(4,), ratios=(1.0,), anchor_stride=1))


def test_torchvision_convention_equals_its_anchor_generator():
    """`rpn.anchor_offset=0` and `rpn.round_anchors` at the `torchvision` preset: exactly the anchors of torchvision's
    AnchorGenerator for maskrcnn_resnet50_fpn (its ratios are h / w, ours w / h: (2, 1, 0.5) is its (0.5, 1, 2))."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    from mrcnn.config import torchvision_maskrcnn

    config = torchvision_maskrcnn().override(["image.max_dim=320", "image.min_dim=320"])
    generator = AnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    features = [torch.zeros(1, 1, 320 // s, 320 // s) for s in (4, 8, 16, 32, 64)]
    theirs = generator(ImageList(torch.zeros(1, 3, 320, 320), [(320, 320)]), features)[0]
    ours = anchors_from_config(config)
    assert torch.equal(ours, theirs)
    # each convention on its own moves them: centres by half a stride, sizes by the rounding
    centred = anchors_from_config(config.override(["rpn.anchor_offset=0.5"]))
    assert torch.equal(centred[0] - ours[0], torch.tensor([2.0, 2.0, 2.0, 2.0]))  # P2: stride 4
    unrounded = anchors_from_config(config.override(["rpn.round_anchors=false"]))
    assert not torch.equal(unrounded, ours) and (unrounded - ours).abs().max() < 0.5 + 1e-4


def test_off_centre_anchors_have_no_flip_permutation():
    with pytest.raises(ValueError) as refused:
        flip_permutation(replace(TINY, offset=0.0))
    assert str(refused.value) == ("anchors are not mirror-symmetric: centres at (j + 0.0) * stride, not at "
                                  "(j + 0.5) * stride")
    # rounding keeps the symmetry
    perm = flip_permutation(replace(TINY, round_sizes=True))
    anchors = generate_anchors(replace(TINY, round_sizes=True))
    torch.testing.assert_close(anchors[perm][:, [2, 0]], 8 - anchors[:, [0, 2]])

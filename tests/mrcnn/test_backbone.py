from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from mrcnn.backbone import BackboneWeightsError, ResNetBackbone, load_backbone_weights
from tests.support.torchvision_reference import randomised_resnet18

torch.set_num_threads(1)  # shared 2-core machine: one thread avoids OpenMP contention


def _resnet(depth: int, **settings) -> ResNetBackbone:
    """A trunk with the coco preset's backbone settings, `settings` overriding them."""
    return ResNetBackbone(depth, **{"frozen_bn": True, "trainable_layers": 5, "frozen_bn_eps": 1e-5, **settings})


def test_weights_round_trip_matches_torchvision_features():
    reference = randomised_resnet18()
    backbone = _resnet(18)  # FrozenBatchNorm2d, as the coco preset
    load_backbone_weights(backbone, reference.state_dict())  # includes fc.* and num_batches_tracked
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        c2, c3, c4, c5 = backbone(x)
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected_c2 = reference.layer1(stem)
        expected_c5 = reference.layer4(reference.layer3(reference.layer2(expected_c2)))
    torch.testing.assert_close(c2, expected_c2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c5, expected_c5, rtol=1e-4, atol=1e-5)
    assert [c.shape[1] for c in (c2, c3, c4, c5)] == backbone.out_channels == [64, 128, 256, 512]
    assert [c.shape[-1] for c in (c2, c3, c4, c5)] == [16, 8, 4, 2]


def test_load_into_a_model_holding_the_backbone():
    reference = randomised_resnet18()
    holder = nn.Module()
    holder.backbone = _resnet(18, frozen_bn=False)
    loaded = load_backbone_weights(holder, reference.state_dict())
    assert loaded is holder.backbone
    assert torch.equal(holder.backbone.layer3[1].bn2.running_var, reference.layer3[1].bn2.running_var)


def test_incompatible_weights_error_lists_missing_and_unexpected_keys():
    with pytest.raises(BackboneWeightsError) as err:
        load_backbone_weights(_resnet(50), torchvision.models.resnet18(weights=None).state_dict(),
                              source="r18.pth")
    message = str(err.value)
    assert message.startswith("r18.pth does not fit a ResNet-50 backbone")
    assert "missing keys [" in message and "layer1.0.conv3.weight" in message  # bottleneck-only conv
    assert "unexpected keys [" in message and "fc." not in message  # the classifier is ignored


def test_shape_mismatch_and_a_state_that_is_no_dict_are_clear_errors():
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(BackboneWeightsError, match=r"conv1\.weight: file \(64, 3, 3, 3\) != model \(64, 3, 7, 7\)"):
        load_backbone_weights(_resnet(18), state)
    with pytest.raises(BackboneWeightsError, match="bad.pth: expected a state dict, got list"):
        load_backbone_weights(_resnet(18), [torch.zeros(1)], source="bad.pth")


def test_frozen_bn_by_default_and_trainable_layers_freeze_from_the_bottom():
    backbone = _resnet(18, trainable_layers=2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    trains = {
        name: all(p.requires_grad for p in getattr(backbone, name).parameters())
        for name in ("conv1", "layer1", "layer2", "layer3", "layer4")
    }
    assert trains == {"conv1": False, "layer1": False, "layer2": False, "layer3": True, "layer4": True}
    backbone.freeze(0)
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.freeze(5)
    assert all(p.requires_grad for p in backbone.parameters())


def test_frozen_stages_keep_batchnorm_statistics_in_training():
    backbone = _resnet(18, frozen_bn=False, trainable_layers=3).train()
    before = backbone.layer1[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(backbone.layer1[0].bn1.running_mean, before)  # layer1 frozen: stats untouched
    assert backbone.layer2[0].bn1.training and not backbone.layer1[0].bn1.training


def test_frozen_bn_eps_is_a_setting():
    """backbone.frozen_bn_eps reaches every FrozenBatchNorm2d (torchvision's COCO v1 weights want 0.0)."""
    from mrcnn.config import coco, torchvision_maskrcnn
    from mrcnn.model import build_model

    for config, eps in ((coco(), 1e-5), (torchvision_maskrcnn(), 0.0)):
        norms = [m for m in build_model(config, num_classes=2).backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
        assert len(norms) == 53 and {m.eps for m in norms} == {eps}

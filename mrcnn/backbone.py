"""ResNet backbone: torchvision's ResNet-18/34/50/101 trunk returning the C2..C5 feature maps.

Built with `weights=None` (nothing is ever downloaded); pretrained weights are a state dict given to
`load_backbone_weights` (the pipelines read the file), in torchvision's own format (`conv1.weight`,
`layer1.0.bn1.running_mean`, ...), so the state dict of `torchvision.models.resnet50(weights=...)` loads as is.

Glossary: N images, C2..C5 the outputs of ResNet stages layer1..layer4 (strides 4, 8, 16, 32).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from mrcnn.schema import Config

RESNETS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
}

# Stages from the top down; `trainable_layers=k` trains the first k of them (torchvision's convention).
_STAGES_TOP_DOWN = ("layer4", "layer3", "layer2", "layer1", "stem")


class BackboneWeightsError(RuntimeError):
    """Backbone weights that cannot be loaded: a missing file, or keys/shapes that do not match the model."""


class ResNetBackbone(nn.Module):
    """ResNet trunk without the classifier.

    Submodules keep torchvision's names (`conv1`, `bn1`, `layer1`..`layer4`) so that a torchvision ResNet
    state dict loads without renaming. `out_channels` lists the channels of C2..C5.
    """

    def __init__(self, depth: int, *, frozen_bn: bool, trainable_layers: int, frozen_bn_eps: float):
        super().__init__()
        if depth not in RESNETS:
            raise ValueError(f"ResNet depth {depth} not supported (choose from {sorted(RESNETS)})")
        # FrozenBatchNorm2d: with 1-2 images per GPU, batch statistics are too noisy to train, so the
        # (pretrained) statistics and affine parameters are kept fixed, as in Detectron and torchvision.
        # frozen_bn_eps: its eps (torchvision's COCO v1 Mask R-CNN weights: 0.0)
        norm_layer = partial(FrozenBatchNorm2d, eps=frozen_bn_eps) if frozen_bn else nn.BatchNorm2d
        resnet = RESNETS[depth](weights=None, norm_layer=norm_layer)
        self.depth = depth
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        expansion = 4 if depth >= 50 else 1
        self.out_channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
        self.freeze(trainable_layers)

    @classmethod
    def from_config(cls, config: Config) -> ResNetBackbone:
        """The backbone section's trunk (weights random: `load_backbone_weights` loads pretrained ones)."""
        bb = config.backbone
        return cls(bb.depth, frozen_bn=bb.frozen_bn, trainable_layers=bb.trainable_layers,
                   frozen_bn_eps=bb.frozen_bn_eps)

    def stage_modules(self, name: str) -> list[nn.Module]:
        return [self.conv1, self.bn1] if name == "stem" else [getattr(self, name)]

    def freeze(self, trainable_layers: int) -> None:
        """Train the top `trainable_layers` stages (5 = all, 0 = none); freeze the rest, from the bottom."""
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
        train = set(_STAGES_TOP_DOWN[:trainable_layers])
        for name in _STAGES_TOP_DOWN:
            for module in self.stage_modules(name):
                for param in module.parameters():
                    param.requires_grad_(name in train)
        self.trainable_layers = trainable_layers
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNetBackbone:
        """Frozen stages keep their BatchNorm2d statistics fixed too (eval mode) while the rest trains."""
        super().train(mode)
        frozen = _STAGES_TOP_DOWN[self.trainable_layers :]
        for name in frozen:
            for module in self.stage_modules(name):
                for sub in module.modules():
                    if isinstance(sub, nn.BatchNorm2d):
                        sub.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """images: [N, 3, H, W] normalised float -> [C2, C3, C4, C5], Ci: [N, out_channels[i-2], H/2^i, W/2^i]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


def _find_backbone(model: nn.Module) -> ResNetBackbone:
    """The ResNetBackbone itself, or the one inside a model (e.g. `MaskRCNN.backbone`)."""
    if isinstance(model, ResNetBackbone):
        return model
    for module in model.modules():
        if isinstance(module, ResNetBackbone):
            return module
    raise BackboneWeightsError(f"{type(model).__name__} holds no ResNetBackbone")


def load_backbone_weights(model: nn.Module, state: Mapping[str, Tensor], *, source: str = "the state dict"
                          ) -> ResNetBackbone:
    """Load a torchvision-format ResNet state dict into `model`'s ResNetBackbone.

    `model` is a ResNetBackbone or a module containing one; `source` names where the state dict came from (the
    file) in messages. The classifier (`fc.*`) and BatchNorm `num_batches_tracked` entries are ignored; any other
    missing or unexpected key, or a shape mismatch, raises BackboneWeightsError naming them. Returns the backbone.
    """
    backbone = _find_backbone(model)
    if not isinstance(state, Mapping):
        raise BackboneWeightsError(f"{source}: expected a state dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    own = backbone.state_dict()
    own = {k for k in own if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise BackboneWeightsError(
            f"{source} does not fit a ResNet-{backbone.depth} backbone: "
            f"missing keys {_listing(missing)}; unexpected keys {_listing(unexpected)}"
        )
    own_tensors = backbone.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} != model {tuple(own_tensors[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(own_tensors[k].shape)
    ]
    if mismatched:
        raise BackboneWeightsError(
            f"{source} does not fit a ResNet-{backbone.depth} backbone: shape mismatch {_listing(mismatched)}"
        )
    # strict=False only because BatchNorm2d backbones also own num_batches_tracked, which we do not require.
    backbone.load_state_dict(state, strict=False)
    return backbone


def _listing(keys: list[str], limit: int = 20) -> str:
    if not keys:
        return "[]"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}] ({len(keys)})"

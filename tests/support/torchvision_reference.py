"""torchvision's Mask R-CNN v1 as a reference for ours: seeded, with weights and inputs that make comparisons tell
(tests/mrcnn/test_torchvision_weights.py says why each choice is made)."""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d


def freeze_batchnorm(module: nn.Module, eps: float) -> None:
    """Every BatchNorm2d under `module` -> FrozenBatchNorm2d(eps) with its statistics and affine parameters."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child, eps)


def torchvision_reference(seed: int = 0) -> nn.Module:
    """torchvision's Mask R-CNN v1, seeded, with the non-degenerate weights described at the top, in eval mode."""
    torch.manual_seed(seed)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    gen = torch.Generator().manual_seed(seed + 1)
    for module in model.backbone.body.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            var = torch.rand(n, generator=gen) + 0.5
            tiny = torch.rand(n, generator=gen) < 0.1
            var[tiny] = 1e-4 + torch.rand(int(tiny.sum()), generator=gen) * 9e-4
            module.running_var.copy_(var)
            # weight ~ sqrt(var): each channel keeps its scale (no blow-up through 53 layers) and eps still shows
            module.weight.data.copy_(var.sqrt() * (torch.rand(n, generator=gen) * 0.5 + 0.5))
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    freeze_batchnorm(model.backbone.body, eps=0.0)  # what weights=COCO_V1 builds: frozen, overwrite_eps(model, 0.0)
    with torch.no_grad():
        head, box, mask = model.rpn.head, model.roi_heads.box_predictor, model.roi_heads.mask_predictor
        head.cls_logits.weight.normal_(0, 1.0, generator=gen)
        head.cls_logits.bias.normal_(0, 0.5, generator=gen)
        head.bbox_pred.weight.normal_(0, 0.05, generator=gen)
        box.cls_score.weight.normal_(0, 1.5, generator=gen)
        box.cls_score.bias.normal_(0, 0.5, generator=gen)
        box.bbox_pred.weight.normal_(0, 0.1, generator=gen)
        mask.mask_fcn_logits.weight.normal_(0, 0.2, generator=gen)
    return model.eval()


def sample_images(size: int, windows, seed: int = 0) -> torch.Tensor:
    """uint8 [N, 3, size, size], one image per window (x1, y1, x2, y2) from (0, 0): smooth random texture with bright
    blocks inside the window, zero padding around it."""
    rng = np.random.default_rng(seed)
    images = np.zeros((len(windows), 3, size, size), np.uint8)
    for i, (_, _, w, h) in enumerate(windows):
        coarse = rng.integers(0, 256, (3, h // 16 + 1, w // 16 + 1)).astype(np.float32)
        texture = np.kron(coarse, np.ones((1, 16, 16), np.float32))[:, :h, :w]
        texture += rng.normal(0, 20, texture.shape)
        for _ in range(4):
            x, y = rng.integers(0, w - 80), rng.integers(0, h - 80)
            texture[:, y : y + rng.integers(30, 80), x : x + rng.integers(30, 80)] = rng.integers(0, 256, (3, 1, 1))
        images[i, :, :h, :w] = np.clip(texture, 0, 255).astype(np.uint8)
    return torch.from_numpy(images)


def randomised_resnet18() -> nn.Module:
    """A torchvision ResNet-18 with non-trivial BatchNorm statistics, so a load that skipped them would show."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return reference.eval()

"""The peer of bench/tune_preset.py: torchvision's Mask R-CNN trained the same way on the same dataset.

    .venv/bin/python bench/train_torchvision.py --dataset DATASET [--config shapes] [--set train.steps=400 ...]
        [--our-heads] [--tv rpn_fg_iou_thresh=0.5 ...] [--threads 1]

torchvision's `MaskRCNN` with a ResNet-18 FPN built from scratch (trainable BatchNorm, no weights), the FPN width,
anchor sizes, input size, detections per image and the optimiser, lr schedule, batch, steps, flip and gradient
clip of our config; everything else at torchvision's defaults (512 RoIs, 1024-wide box head, 256-wide mask
head: about 1 image/s a core at 128 px here), or with `--our-heads` at our config's head widths, RoI and
proposal counts and IoU thresholds; `--tv NAME=VALUE` (a `MaskRCNN` keyword) overrides either.
It reads the COCO-layout dataset directly (images, `annToMask`), as torchvision's own reference scripts
do, and scores the validation split with our pycocotools wrapper at detection threshold 0.05, so its AP
compares with `tune_preset.py --min-confidence 0.05` run on shards of the same dataset.
"""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mrcnn.config import load_config
from pipelines.data.coco import load_image_rgb
from pipelines.data.coco_metrics import evaluate_detections
from pipelines.training.optim import build_optimizer, build_scheduler, scaled_lr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script
from bench import options  # noqa: E402


def our_head_settings(config, num_classes: int) -> dict:
    """torchvision's heads and samplers at the sizes and counts of our config (widths, RoIs, proposals, IoUs)."""
    rpn, roi, width = config.rpn, config.roi, config.backbone.fpn_channels
    levels = ["0", "1", "2", "3"]
    return dict(
        rpn_fg_iou_thresh=rpn.positive_iou, rpn_bg_iou_thresh=rpn.negative_iou,
        rpn_batch_size_per_image=rpn.anchors_per_image, rpn_positive_fraction=rpn.positive_fraction,
        rpn_pre_nms_top_n_train=rpn.pre_nms_topk, rpn_pre_nms_top_n_test=rpn.pre_nms_topk,
        rpn_post_nms_top_n_train=rpn.post_nms_train, rpn_post_nms_top_n_test=rpn.post_nms_test,
        box_batch_size_per_image=roi.rois_per_image, box_positive_fraction=roi.positive_fraction,
        box_fg_iou_thresh=roi.positive_iou, box_bg_iou_thresh=roi.positive_iou,
        box_nms_thresh=config.detection.nms_threshold,
        box_roi_pool=MultiScaleRoIAlign(levels, roi.pool_size, roi.sampling_ratio),
        box_head=TwoMLPHead(width * roi.pool_size**2, roi.fc_dim),
        box_predictor=FastRCNNPredictor(roi.fc_dim, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(levels, roi.mask_pool_size, roi.sampling_ratio),
        mask_head=MaskRCNNHeads(width, [roi.mask_conv_dim] * roi.mask_conv_layers, 1),
        mask_predictor=MaskRCNNPredictor(roi.mask_conv_dim, roi.mask_conv_dim, num_classes),
    )


def build_peer(config, num_classes: int, extra: dict, our_heads: bool = False) -> MaskRCNN:
    """torchvision Mask R-CNN at our geometry: ResNet-18 (trainable BN) + FPN of `fpn_channels`."""
    body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(
        body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, [64, 128, 256, 512],
        config.backbone.fpn_channels, extra_blocks=LastLevelMaxPool(),
    )
    anchors = AnchorGenerator(tuple((s,) for s in config.rpn.anchor_scales),
                              (tuple(config.rpn.anchor_ratios),) * len(config.rpn.anchor_scales))
    kwargs = dict(min_size=config.image.min_dim, max_size=config.image.max_dim, rpn_anchor_generator=anchors,
                  box_detections_per_img=config.detection.max_detections, box_score_thresh=0.05)
    if our_heads:
        kwargs.update(our_head_settings(config, num_classes))
    if not our_heads:
        kwargs["num_classes"] = num_classes  # else the predictors carry it
    return MaskRCNN(backbone, **{**kwargs, **extra})


def load_split(coco: COCO, images: Path, cat_index: dict[int, int]) -> list[tuple[int, torch.Tensor, dict]]:
    """(image id, [3, H, W] float 0..1, target) for every image with at least one non-crowd instance."""
    out = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        pixels = torch.from_numpy(load_image_rgb(images / info["file_name"])).permute(2, 0, 1).float() / 255
        if not anns:
            out.append((image_id, pixels, {}))
            continue
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32)
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]))
        labels = torch.tensor([cat_index[a["category_id"]] for a in anns])
        out.append((image_id, pixels, {"boxes": boxes, "labels": labels, "masks": masks}))
    return out


def hflip(pixels: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = pixels.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return pixels.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


def main() -> None:
    parser = options.parser(__doc__)
    parser.add_argument("--dataset", required=True, help="COCO layout: annotations/instances_<split>.json, <split>/")
    options.add_config(parser, shards=False)
    parser.add_argument("--tv", action="append", default=[], help="MaskRCNN keyword NAME=VALUE")
    parser.add_argument("--our-heads", action="store_true", help="head widths, RoI and proposal counts of --config")
    options.add_threads(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config(args.config, args.set)
    tc = config.train
    root = Path(args.dataset)
    train_gt = COCO(str(root / "annotations" / "instances_train2017.json"))
    val_file = str(root / "annotations" / "instances_val2017.json")
    val_gt = COCO(val_file)
    coco_ids = sorted(train_gt.getCatIds())
    cat_index = {c: i + 1 for i, c in enumerate(coco_ids)}
    train = [t for t in load_split(train_gt, root / "train2017", cat_index) if t[2]]
    val = load_split(val_gt, root / "val2017", cat_index)
    extra = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.tv)}
    model = build_peer(config, len(coco_ids) + 1, extra, our_heads=args.our_heads)
    lr = scaled_lr(tc.lr, global_batch=tc.batch_size, reference_batch=tc.lr_reference_batch)
    optimizer = build_optimizer(model, lr=lr, momentum=tc.momentum, weight_decay=tc.weight_decay, kind=tc.optimizer)
    scheduler = build_scheduler(optimizer, total_steps=max(tc.steps, 1), warmup_steps=tc.warmup_steps,
                                schedule=tc.schedule, decay_at=tc.decay_at, decay_factor=tc.decay_factor)
    rng, order, started = np.random.default_rng(tc.seed), [], time.perf_counter()
    flips = torch.Generator().manual_seed(tc.seed)
    model.train()
    for step in range(tc.steps):
        if len(order) < tc.batch_size:
            order = list(rng.permutation(len(train)))
        images, targets = [], []
        for i in (order.pop() for _ in range(tc.batch_size)):
            pixels, target = train[i][1], train[i][2]
            if tc.flip and bool(torch.rand(1, generator=flips) < 0.5):
                pixels, target = hflip(pixels, target)
            images.append(pixels)
            targets.append(target)
        losses = model(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            rate = (step + 1) * tc.batch_size / (time.perf_counter() - started)
            terms = " ".join(f"{k[5:]}={float(v.detach()):.3f}" for k, v in losses.items())
            print(f"step {step} loss={float(total.detach()):.3f} {terms} {rate:.1f} img/s", flush=True)
    seconds = time.perf_counter() - started
    model.eval()
    detections = []
    with torch.no_grad():
        for start in range(0, len(val), 8):
            chunk = val[start:start + 8]
            for (image_id, _, _), out in zip(chunk, model([c[1] for c in chunk]), strict=True):
                for box, label, score, mask in zip(out["boxes"], out["labels"], out["scores"], out["masks"],
                                                   strict=True):
                    rle = mask_util.encode(np.asfortranarray((mask[0] >= 0.5).numpy().astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    x1, y1, x2, y2 = box.tolist()
                    detections.append({"image_id": image_id, "category_id": coco_ids[int(label) - 1],
                                       "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score),
                                       "segmentation": rle})
    m = evaluate_detections(val_file, detections).metrics
    print(f"torchvision val: segm AP {m['segm/AP']:.3f} AP50 {m['segm/AP50']:.3f} | "
          f"bbox AP {m['bbox/AP']:.3f} AP50 {m['bbox/AP50']:.3f}")
    print(f"{tc.steps} steps of {tc.batch_size} in {seconds:.0f} s ({tc.steps * tc.batch_size / seconds:.1f} img/s); "
          f"settings: {args.set} {args.tv}")


if __name__ == "__main__":
    main()

"""A training batch as the loader ships it (sparse RPN deltas), built from random ellipses without shards or Ray:
for the GPU tests and bench/bench_gpu.py, which run where only torch, torchvision, numpy, pillow and pyarrow are."""

from __future__ import annotations

import numpy as np
import torch

from mrcnn.config import Config
from mrcnn.mini_masks import mini_mask_boxes, minimize_masks
from mrcnn.rpn_targets import compute_rpn_targets
from pipelines.data.loader import rpn_labels

# the labelling the batches were built with (the coco preset's rpn section)
RPN_RULES = {"positive_iou": 0.7, "negative_iou": 0.3, "crowd_iou": 0.001, "bbox_std": (0.1, 0.1, 0.2, 0.2)}


def random_instances(size: int, n: int, instances: int, num_classes: int, seed: int = 0,
                     empty: tuple[int, ...] = (), sides: tuple[int, int] | None = None):
    """images uint8 [n, size, size, 3]; per image (boxes float32 [G, 4] x1y1x2y2, masks bool [G, size, size],
    labels int64 [G] in 1..num_classes-1) of ellipses with sides in [sides[0], sides[1]) px (default size/12 to
    size/3); the images listed in `empty` have no instance."""
    lo, hi = sides or (size // 12, size // 3)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    per_image = []
    for i in range(n):
        boxes, masks = [], []
        for _ in range(0 if i in empty else instances):
            w, h = rng.integers(lo, hi, size=2)
            x1, y1 = rng.integers(0, size - w), rng.integers(0, size - h)
            cx, cy = x1 + w / 2, y1 + h / 2
            masks.append(((xx + 0.5 - cx) / (w / 2)) ** 2 + ((yy + 0.5 - cy) / (h / 2)) ** 2 <= 1)
            boxes.append([x1, y1, x1 + w, y1 + h])
        labels = rng.integers(1, num_classes, size=len(boxes))
        per_image.append((np.asarray(boxes, np.float32).reshape(-1, 4),
                          np.stack(masks) if masks else np.zeros((0, size, size), bool), labels.astype(np.int64)))
    return images, per_image


def loader_batch(config: Config, anchors: torch.Tensor, images: np.ndarray, per_image) -> dict[str, torch.Tensor]:
    """The Batch of pipelines/data/loader.py (scale 1, window = the whole image), with the RPN deltas sparse
    (`rpn_pos_idx` [N, K], -1 padded, and `rpn_pos_deltas` [N, K, 4], K = rpn.anchors_per_image), the labels
    made by the loader's `rpn_labels`."""
    n, size = len(images), images.shape[1]
    g, m, a, k = config.roi.max_gt_instances, config.mask.mini_mask_size, anchors.shape[0], config.rpn.anchors_per_image
    batch = {
        "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        "windows": torch.tensor([[0, 0, size, size]] * n),
        "image_ids": torch.arange(n),
        "scales": torch.ones(n),
        "heights": torch.full((n,), size),
        "widths": torch.full((n,), size),
        "gt_class_ids": torch.zeros(n, g, dtype=torch.int64),
        "gt_boxes": torch.zeros(n, g, 4),
        "gt_mini_masks": torch.zeros(n, g, m, m, dtype=torch.uint8),
        "crowd_boxes": torch.zeros(n, 16, 4),
        "rpn_match": torch.zeros(n, a, dtype=torch.int8),
        "rpn_pos_idx": torch.full((n, k), -1, dtype=torch.int64),
        "rpn_pos_deltas": torch.zeros(n, k, 4),
    }
    for i, (boxes, masks, labels) in enumerate(per_image):
        boxes_t = torch.from_numpy(boxes)
        count = len(boxes)
        if count:
            batch["gt_boxes"][i, :count] = boxes_t
            batch["gt_class_ids"][i, :count] = torch.from_numpy(labels)
            mini = minimize_masks(torch.from_numpy(masks), mini_mask_boxes(boxes_t), size=m)
            batch["gt_mini_masks"][i, :count] = mini.to(torch.uint8)
        targets = compute_rpn_targets(anchors=anchors, gt_boxes=boxes_t, crowd_boxes=torch.zeros(0, 4), **RPN_RULES)
        row = {"image_id": i, "rpn_pos_idx": targets.pos_idx.numpy(), "rpn_pos_deltas": targets.pos_deltas.numpy(),
               "rpn_ignore_idx": targets.ignore_idx.numpy()}
        match, pos, deltas = rpn_labels(row, num_anchors=a, max_positives=k)  # the loader's own labels
        batch["rpn_match"][i] = torch.from_numpy(match)
        batch["rpn_pos_idx"][i, : len(pos)] = torch.from_numpy(pos)
        batch["rpn_pos_deltas"][i, : len(pos)] = torch.from_numpy(deltas)
    return batch

"""Detection layer and the way back to original pixels.

`detect`: box-head outputs -> per-image detections: every (RoI, class) pair with score >= min_confidence,
refined by that class's deltas and clipped to the window, then NMS per image and class, best
`max_detections` kept per image. `detections_to_original` maps one image's detections to the original image:
boxes through the resize geometry, 28x28 mask probabilities pasted into their boxes and thresholded at 0.5.

Glossary: N images, R RoIs, K classes including background (0), D detections of one image, M mask size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from mrcnn.box_coder import decode
from mrcnn.geometry import boxes_to_original
from mrcnn.mini_masks import paste_masks
from mrcnn.proposals import clip_to_window, split_by_image, top_per_group
from mrcnn.schema import Config


@dataclass(frozen=True)
class DetectionSettings:
    """The detection layer of a model: `detect`'s settings (the box head's bbox std, the detection section).
    A stage that evaluates at another threshold replaces the model's: `dataclasses.replace(model.detection_settings,
    min_confidence=...)`."""

    bbox_std: tuple[float, float, float, float]
    min_confidence: float
    nms_threshold: float
    max_detections: int
    min_size: float

    @classmethod
    def from_config(cls, config: Config) -> DetectionSettings:
        det = config.detection
        return cls(bbox_std=config.roi.bbox_std, min_confidence=det.min_confidence, nms_threshold=det.nms_threshold,
                   max_detections=det.max_detections, min_size=det.min_size)

    def detect(self, class_logits: Tensor, pred_deltas: Tensor, rois: Tensor, image_idx: Tensor,
               windows: Tensor) -> list[dict[str, Tensor]]:
        """`detect` with these settings (shapes there)."""
        return detect(class_logits, pred_deltas, rois, image_idx, windows, **self._settings())

    def detect_flat(self, class_logits: Tensor, pred_deltas: Tensor, rois: Tensor, image_idx: Tensor,
                    windows: Tensor) -> dict[str, Tensor]:
        """`flat_detections` with these settings (shapes there)."""
        return flat_detections(class_logits, pred_deltas, rois, image_idx, windows, **self._settings())

    def _settings(self) -> dict:
        return dict(bbox_std=self.bbox_std, min_confidence=self.min_confidence, nms_threshold=self.nms_threshold,
                    max_detections=self.max_detections, min_size=self.min_size)


@torch.no_grad()
def flat_detections(
    class_logits: Tensor,
    pred_deltas: Tensor,
    rois: Tensor,
    image_idx: Tensor,
    windows: Tensor,
    *,
    bbox_std: tuple[float, float, float, float],
    min_confidence: float,
    nms_threshold: float,
    max_detections: int,
    min_size: float,
) -> dict[str, Tensor]:
    """Detections of all images together, grouped by image.

    class_logits: [R, K]; pred_deltas: [R, K, 4] (divided by `bbox_std`); rois: [R, 4] padded px;
    image_idx: int64 [R]; windows: [N, 4]. Returns one dict of T = sum D_i rows: boxes [T, 4] padded px,
    class_ids int64 [T] (>= 1), scores [T] softmax probabilities, roi_index int64 [T] (the RoI each came from),
    image_idx int64 [T]; by image, then by decreasing score, at most max_detections per image.
    """
    num_images, num_classes = windows.shape[0], class_logits.shape[1]
    scores = torch.softmax(class_logits.float(), dim=1)[:, 1:]  # [R, K-1], background dropped
    # (R, K-1, 4) deltas against (R, 4) RoIs: each class's own refinement, in float32
    boxes = decode(pred_deltas[:, 1:].float(), rois.float(), std=bbox_std)
    boxes = clip_to_window(boxes, windows[image_idx])
    roi_index = torch.arange(rois.shape[0], device=rois.device).unsqueeze(1).expand_as(scores)
    class_ids = torch.arange(1, num_classes, device=rois.device).unsqueeze(0).expand_as(scores)
    sizes = boxes[..., 2:] - boxes[..., :2]
    keep = (scores >= min_confidence) & (sizes >= min_size).all(dim=-1)  # [R, K-1]
    boxes, scores, roi_index, class_ids = boxes[keep], scores[keep], roi_index[keep], class_ids[keep]
    images = image_idx[roi_index]
    # One NMS call for the batch, grouped by (image, class). float64: batched_nms offsets each group by
    # group * (max coordinate + 1), up to ~N*K*1000, where float32 would blur box edges.
    kept = batched_nms(boxes.double(), scores.double(), images * num_classes + class_ids, nms_threshold)
    kept = kept[top_per_group(images[kept], max_detections, num_images)]
    columns = {"boxes": boxes, "class_ids": class_ids, "scores": scores, "roi_index": roi_index, "image_idx": images}
    return {name: values[kept] for name, values in columns.items()}


def detect(class_logits: Tensor, pred_deltas: Tensor, rois: Tensor, image_idx: Tensor, windows: Tensor,
           **settings) -> list[dict[str, Tensor]]:
    """`flat_detections` (arguments there) split per image: N dicts of boxes [D, 4] padded px, class_ids int64 [D]
    (>= 1), scores [D], roi_index int64 [D], by decreasing score."""
    flat = flat_detections(class_logits, pred_deltas, rois, image_idx, windows, **settings)
    num_images, images = windows.shape[0], flat.pop("image_idx")
    per_image = {name: split_by_image(values, images, num_images) for name, values in flat.items()}
    return [{name: per_image[name][i] for name in flat} for i in range(num_images)]


def pad_per_image(columns: dict[str, Tensor], image_idx: Tensor, num_images: int, size: int) -> dict[str, Tensor]:
    """Rows of all images, grouped by image (image_idx int64 [T], non-decreasing, at most `size` rows an image) ->
    `count` int64 [N] and each column [T, ...] as [N, size, ...], zero past an image's count. Tensor ops only (no
    Python ints of the data), so that a traced ONNX graph gets fixed-shape outputs."""
    onehot = (image_idx.unsqueeze(1) == torch.arange(num_images, device=image_idx.device)).long()  # [T, N]
    count = onehot.sum(0)
    first = count.cumsum(0) - count  # row of each image's first detection
    slot = image_idx * size + torch.arange(image_idx.shape[0], device=image_idx.device) - first[image_idx]
    out = {"count": count}
    for name, values in columns.items():
        padded = values.new_zeros((num_images * size, *values.shape[1:]))
        padded[slot] = values  # (T, ...) scattered into (N*D, ...)
        out[name] = padded.view(num_images, size, *values.shape[1:])
    return out


def paste_masks_in_image(masks: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5) -> Tensor:
    """Paste mask probabilities into their boxes on a height x width image and threshold them.

    masks: [D, M, M] probabilities; boxes: [D, 4] (x1, y1, x2, y2) in the target image's pixels ->
    [D, height, width] bool. Bilinear resampling over the box, zero outside (mini_masks.paste_masks, the
    values of grid_sample with align_corners=False), in chunks so that the float copy stays near 64 MB.
    """
    out = torch.zeros(masks.shape[0], height, width, dtype=torch.bool, device=masks.device)
    chunk = max(1, (1 << 24) // max(1, height * width))
    for first in range(0, masks.shape[0], chunk):
        sl = slice(first, first + chunk)
        out[sl] = paste_masks(masks[sl], boxes[sl], height, width) >= threshold
    return out


def detections_to_original(
    det: dict[str, Tensor], *, scale: float, window: tuple[int, int, int, int] | Tensor, height: int, width: int
) -> dict[str, Tensor]:
    """One image's detections (model eval output) in original pixels.

    det: boxes [D, 4] padded px, class_ids [D], scores [D], masks [D, M, M] probabilities.
    Returns boxes [D, 4] original px clipped to the image, class_ids, scores, masks [D, height, width] bool.
    """
    boxes = boxes_to_original(det["boxes"].float(), scale=scale, window=window)
    # Paste with the unclipped box: the mask was predicted for exactly that box.
    masks = paste_masks_in_image(det["masks"], boxes, int(height), int(width))
    limits = boxes.new_tensor([width, height, width, height])
    clipped = torch.minimum(boxes.clamp(min=0), limits)
    return {"boxes": clipped, "class_ids": det["class_ids"], "scores": det["scores"], "masks": masks}

"""The model as one ONNX graph, from the uint8 canvas to the detections padded to a fixed size with a count.

Traced by torch.onnx's TorchScript-based exporter (`dynamo=False`), with torchvision's ONNX symbolics for
`roi_align` (opset >= 16: RoiAlign's coordinate_transformation_mode carries roi.aligned) and `nms`. Where the eval
path returns N per-image lists of data-dependent length, under export it returns them padded
(`MaskRCNN._detections`, `mrcnn.detections.pad_per_image`): these are the only lines that differ.

    inputs   images      uint8   [B, 3, S, S]   canvases, the image at the top-left (S = image.max_dim)
             windows     int64   [B, 4]         (x1, y1, x2, y2) the image's region of each canvas
    outputs  det_count   int64   [B]            detections of each image (rows past it are zero)
             det_boxes   float32 [B, D, 4]      (x1, y1, x2, y2) padded-image pixels
             det_scores  float32 [B, D]
             det_classes int64   [B, D]         contiguous class ids (>= 1)
             det_masks   float32 [B, D, M, M]   probabilities of the predicted class

B and D = detection.max_detections are fixed in the graph, and so is detection.min_confidence.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import torch
from torch import Tensor, nn

INPUTS = ("images", "windows")
OUTPUTS = ("det_count", "det_boxes", "det_scores", "det_classes", "det_masks")
MIN_OPSET = 16  # RoiAlign's coordinate_transformation_mode (half_pixel = roi.aligned)
DEFAULT_OPSET = 17
META_KEY = "mrcnn_meta"  # the metadata entry holding what the exporter was given as `meta` (JSON)


class _Graph(nn.Module):
    """The model with positional inputs and the outputs as a tuple in OUTPUTS order (what the tracer takes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, windows: Tensor) -> tuple[Tensor, ...]:
        out = self.model({"images": images, "windows": windows})
        return out["count"], out["boxes"], out["scores"], out["class_ids"], out["masks"]


def onnx_bytes(model: nn.Module, *, image_size: int, batch: int, opset: int = DEFAULT_OPSET,
               meta: dict[str, Any] | None = None) -> bytes:
    """The serialized ONNX model of `model` (a MaskRCNN on the CPU, put in eval mode) for `batch` canvases of
    `image_size`, checked with `onnx.checker`; `meta` (JSON-able) is stored as the metadata entry META_KEY."""
    import onnx

    if batch < 1 or opset < MIN_OPSET:
        raise ValueError(f"batch must be at least 1 and opset at least {MIN_OPSET}, got {batch} and {opset}")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=gen)
    windows = torch.tensor([[0, 0, image_size, image_size]] * batch, dtype=torch.int64)
    buffer = io.BytesIO()
    # the wrapper in eval mode too: the exporter puts the module it is given back in its mode, recursively
    graph = _Graph(model.eval()).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer's warnings about Python values of the trace (the fixed batch, anchors and settings: constant by
        # design), torch.jit's deprecation notice, and one about negative indices, which this graph's never are
        # (they come from nonzero, arange and sorts), say nothing to a user
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(graph, (images, windows), buffer, dynamo=False, opset_version=opset,
                          input_names=list(INPUTS), output_names=list(OUTPUTS), do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    if meta is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()

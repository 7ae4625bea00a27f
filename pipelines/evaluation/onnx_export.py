"""`mrcnn-cli export` and `predict --onnx`: the model as one ONNX file (`mrcnn.export`, where the graph's inputs and
outputs are listed), and an onnxruntime runner with `inference.run_model`'s contract.

The graph's outputs are exactly the packed outputs of `inference.run_model` (det_count, det_boxes, det_scores,
det_classes, det_masks, padded to D = detection.max_detections), so the way back (mask pasting, RLE, COCO results)
is the one predict and evaluate use. The batch B is fixed in the graph (`--batch`): `OnnxModel` runs any number of
images in chunks of B, the last one padded with empty canvases whose rows are dropped. detection.min_confidence is
fixed in the graph too; a higher threshold can be applied afterwards (`OnnxModel(min_confidence=...)`), which gives
exactly what the model would at that threshold (a detection below it can only suppress detections below it).

The file carries what predict needs besides the graph (metadata `mrcnn_meta`: config, categories, num_classes, the
source it was exported from), so `predict --onnx model.onnx` needs nothing else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from mrcnn.config import Config
from mrcnn.export import DEFAULT_OPSET, META_KEY, MIN_OPSET, onnx_bytes
from pipelines.data.errors import InputError
from pipelines.evaluation.inference import PACKED
from pipelines.infra.logs import get_logger
from pipelines.infra.storage import write_bytes
from pipelines.models import ModelSpec, load_model, model_spec

log = get_logger("export")

class OnnxModelError(InputError):
    """A file that is not an exported model of ours, images it cannot take, or export options out of range."""


def export_onnx(model: nn.Module, spec: ModelSpec, out: str | os.PathLike, *, batch: int = 1,
                opset: int = DEFAULT_OPSET) -> int:
    """Trace `model` (put in eval mode, CPU) for `batch` images of `spec.config`'s canvas, check the graph with
    `onnx.checker` and write it to `out` atomically (a temporary name, then renamed); returns its size in bytes."""
    if batch < 1:
        raise OnnxModelError(f"--batch must be at least 1, got {batch}")
    if opset < MIN_OPSET:
        raise OnnxModelError(f"--opset must be at least {MIN_OPSET} (RoiAlign with aligned pixels), got {opset}")
    data = onnx_bytes(model, image_size=spec.config.image.max_dim, batch=batch, opset=opset,
                      meta=onnx_meta(spec.config, spec.categories, spec.num_classes, spec.location))
    write_bytes(out, data)
    log.info("exported %s -> %s (%.1f MB, batch %d, opset %d)", spec.location, out, len(data) / 1e6, batch, opset)
    return len(data)


def onnx_meta(config: Config, categories: dict[str, Any], num_classes: int, source: str) -> dict[str, Any]:
    """What an exported file carries besides the graph (read back as `OnnxMeta`)."""
    return {"config": config.to_dict(), "categories": categories, "num_classes": num_classes, "source": source}


def export_model(model_path: str, out: str | os.PathLike, *, batch: int = 1, opset: int = DEFAULT_OPSET,
                 tracking_uri: str | None = None, overrides: tuple[str, ...] = (),
                 config_path: str | None = None) -> int:
    """`mrcnn-cli export`: the model of `model_path` (any SOURCE predict takes) exported to `out`; its size in
    bytes. A SOURCE that is not a model fails as in predict (`pipelines.models.model_spec`); overrides /
    config_path: the command's --set / --config (inference settings, checked against the model as in predict)."""
    spec = model_spec(model_path, tracking_uri=tracking_uri, overrides=overrides, config_path=config_path)
    return export_onnx(load_model(spec), spec, out, batch=batch, opset=opset)


@dataclass(frozen=True)
class OnnxMeta:
    """What an exported file says of its model: config, categories, num_classes, the source it came from."""

    config: Config
    categories: dict[str, Any]
    num_classes: int
    source: str


class OnnxModel:
    """An exported model in onnxruntime: `(images uint8 [N, 3, S, S], windows int64 [N, 4]) -> packed outputs`
    (`inference.run_model`'s), for any N (run in chunks of the graph's batch B, the last one padded)."""

    def __init__(self, path: str | os.PathLike, *, min_confidence: float | None = None,
                 providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3  # onnxruntime's own warnings (e.g. unused initializers) stay out of the console
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / NoSuchFile types
            raise OnnxModelError(f"{path}: not an ONNX model onnxruntime can load ({exc})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise OnnxModelError(f"{path}: an ONNX model, but not one exported by mrcnn-cli export (no {META_KEY})")
        raw = json.loads(props[META_KEY])
        self.meta = OnnxMeta(Config.from_dict(raw["config"]), raw["categories"], int(raw["num_classes"]),
                             raw["source"])
        shape = self.session.get_inputs()[0].shape  # [B, 3, S, S]
        self.batch, self.image_size = int(shape[0]), int(shape[2])
        baked = self.meta.config.detection.min_confidence
        if min_confidence is not None and min_confidence < baked:
            raise OnnxModelError(f"{path}: exported at detection.min_confidence {baked:g}; a threshold below it "
                                 f"({min_confidence:g}) needs a new export")
        self.min_confidence = baked if min_confidence is None else float(min_confidence)

    def __call__(self, images: np.ndarray, windows: np.ndarray) -> dict[str, np.ndarray]:
        n = len(images)
        if images.shape[1:] != (3, self.image_size, self.image_size):
            raise OnnxModelError(f"images of shape {tuple(images.shape[1:])}; the exported model takes "
                                 f"(3, {self.image_size}, {self.image_size})")
        parts = [self._run(images[i : i + self.batch], windows[i : i + self.batch]) for i in range(0, n, self.batch)]
        packed = {key: np.concatenate([p[key] for p in parts]) for key in PACKED}
        return _above(packed, self.min_confidence) if self.min_confidence > self.meta.config.detection.min_confidence \
            else packed

    def _run(self, images: np.ndarray, windows: np.ndarray) -> dict[str, np.ndarray]:
        """One graph batch: fewer than B images padded with empty canvases (full window), their rows dropped."""
        n, size = len(images), self.image_size
        feed_images = np.zeros((self.batch, 3, size, size), np.uint8)
        feed_windows = np.tile(np.asarray([0, 0, size, size], np.int64), (self.batch, 1))
        feed_images[:n], feed_windows[:n] = images, windows
        outputs = self.session.run(list(PACKED), {"images": feed_images, "windows": feed_windows})
        return {key: value[:n] for key, value in zip(PACKED, outputs, strict=True)}


def _above(packed: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    """The packed detections scoring at least `threshold`, still packed (rows are by decreasing score)."""
    rows = np.arange(packed["det_scores"].shape[1])
    valid = rows[None, :] < packed["det_count"][:, None]
    count = ((packed["det_scores"] >= threshold) & valid).sum(1)
    out = dict(packed, det_count=count.astype(np.int64))
    for key in PACKED[1:]:
        keep = (rows[None, :] < count[:, None]).reshape(count.shape[0], -1, *([1] * (packed[key].ndim - 2)))
        out[key] = np.where(keep, packed[key], 0).astype(packed[key].dtype)
    return out

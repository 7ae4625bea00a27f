"""One COCO image record -> one shard row (`RowMaker`): the code that writes every shard row.

The image file is decoded once (a bad file skips the record) and its bytes stored as they are; only an image the
loader cannot decode to the same pixels (CMYK, 16-bit, palette, alpha, neither JPEG nor PNG) is re-encoded, at its
own size (`image.encoding`, `image.jpeg_quality`). Nothing is resized here: the stored geometry (`scale`, `window`)
tells the loader the size, and the targets are in that resized frame. Class ids are made contiguous; gt boxes
taken from the annotation's `bbox`; masks minimised and bit-packed; RPN targets computed by the model's own
`compute_rpn_targets`. A record that cannot be used returns no row and a report naming the image and the reason.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from mrcnn.anchors import anchors_from_config
from mrcnn.config import Config
from mrcnn.geometry import coco_bbox_to_box, resize_geometry
from mrcnn.mini_masks import mini_mask_boxes, minimize_masks, pack_masks
from mrcnn.rpn_targets import RPNTargetSettings
from pipelines.data.coco import annotation_mask, read_image
from pipelines.data.coco_checks import skip_report
from pipelines.data.errors import ImageError
from pipelines.data.shards import (
    MAX_CROWD,
    SHARD_SCHEMA,
)

# What the workers emit: the shard columns (null for a skipped image) plus bookkeeping the datasink strips.
_WORK_SCHEMA = pa.schema(
    list(SHARD_SCHEMA.remove_metadata())
    + [("_split", pa.string()), ("_ok", pa.bool_()), ("_reports", pa.string()), ("_dropped", pa.int32()),
       ("_crowd_dropped", pa.int32())]
)


def _image_error_reason(error: Exception) -> str:
    """Stable slug + detail for an ImageError raised by `read_image` (its messages name the cause)."""
    msg = str(error)
    for prefix, slug in (
        ("image file not found", "missing_image"),
        ("empty image file", "empty_image_file"),
        ("not a recognised image", "corrupt_image"),
        ("truncated or corrupt", "corrupt_image"),
        ("cannot read image", "unreadable_image"),
        ("image file too large", "oversized_image"),
    ):
        if msg.startswith(prefix):
            return f"{slug}: {msg}"
    return f"bad_image: {msg}"


def _skip(record: dict[str, Any], reason: str, annotation_id: int | None = None, action: str = "skipped") -> dict:
    return skip_report(record.get("image_id"), record.get("file_name"), annotation_id, reason, action)


class RowMaker:
    """One COCO image record -> one shard row. Also the callable class of `map_batches` (set up once per actor).

    `make(record)` returns (row or None, reports): row holds the SHARD_SCHEMA columns as Python / numpy values;
    reports are skip entries ({"image_id", "file", "annotation_id", "reason", "action"}) for the image (when
    row is None) or for single annotations dropped here.
    """

    def __init__(self, config: dict[str, Any], *, torch_threads: int | None = 1):
        if torch_threads:
            torch.set_num_threads(torch_threads)  # one actor per CPU: intra-op threads would only oversubscribe
        self.config = Config.from_dict(config)
        self.anchors = anchors_from_config(self.config)  # [A, 4] padded px, built once per actor
        self.rpn_targets = RPNTargetSettings.from_config(self.config)

    # ------------------------------------------------------------------ map_batches entry point
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        columns: dict[str, list] = {name: [] for name in _WORK_SCHEMA.names}
        for split, text in zip(batch["split"], batch["record"], strict=True):
            record = json.loads(text)
            try:
                row, reports = self.make(record)
            except Exception as e:  # noqa: BLE001 - one bad record must not stop the run; it is reported
                row, reports = None, [_skip(record, f"processing_error: {type(e).__name__}: {e}")]
            if row is None:
                row = {"image_id": record.get("image_id"), "file_name": record.get("file_name")}
            for name in SHARD_SCHEMA.names:
                value = row.get(name)
                columns[name].append(value.tolist() if isinstance(value, np.ndarray) else value)
            columns["_split"].append(str(split))
            columns["_ok"].append("image" in row)
            columns["_reports"].append(json.dumps(reports))
            columns["_dropped"].append(int(row.get("_dropped", 0)))
            columns["_crowd_dropped"].append(int(row.get("_crowd_dropped", 0)))
        return pa.Table.from_pydict(columns, schema=_WORK_SCHEMA)

    # ------------------------------------------------------------------ one record
    def make(self, record: dict[str, Any]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        cfg = self.config
        height, width = int(record["height"]), int(record["width"])
        try:
            # decoded once (a bad file is skipped here); pixels only where the file must be re-encoded
            source = read_image(record["path"], pixels=False)
        except ImageError as e:
            return None, [_skip(record, _image_error_reason(e))]
        if (source.height, source.width) != (height, width):
            reason = (f"size_mismatch: file is {source.width}x{source.height} (w x h), "
                      f"annotations say {width}x{height}")
            return None, [_skip(record, reason)]

        geo = resize_geometry(height, width, min_dim=cfg.image.min_dim, max_dim=cfg.image.max_dim)
        reports: list[dict[str, Any]] = []
        instances = [a for a in record["annotations"] if not a["iscrowd"]]
        crowds = [a for a in record["annotations"] if a["iscrowd"]]

        masks = []  # [H, W] uint8 per kept instance, original resolution
        kept = []
        for ann in instances:
            try:
                masks.append(annotation_mask(ann, height, width))
                kept.append(ann)
            except Exception as e:  # noqa: BLE001 - pycocotools rejects a segmentation read_split let through
                reports.append(_skip(record, f"malformed_segmentation: {type(e).__name__}: {e}", ann["id"]))
        dropped = max(0, len(kept) - cfg.roi.max_gt_instances)
        if dropped:  # keep the largest by area, in their original order
            order = np.argsort([-float(a["area"]) for a in kept], kind="stable")[: cfg.roi.max_gt_instances]
            chosen = sorted(order.tolist())
            kept, masks = [kept[i] for i in chosen], [masks[i] for i in chosen]

        g = len(kept)
        gt_boxes = coco_bbox_to_box(torch.tensor([a["bbox"] for a in kept], dtype=torch.float64).reshape(g, 4),
                                    geo.scale)  # [G, 4] float32 padded px
        crowd_boxes = coco_bbox_to_box(
            torch.tensor([a["bbox"] for a in crowds], dtype=torch.float64).reshape(len(crowds), 4), geo.scale)
        size = cfg.mask.mini_mask_size
        if g:
            # Mini-masks are sampled from the ORIGINAL-resolution mask over the integer padded-frame box mapped
            # back to original pixels (/ scale): no resampling of an already-resized mask.
            mini_boxes = mini_mask_boxes(gt_boxes)
            mini = minimize_masks(torch.from_numpy(np.stack(masks)), mini_boxes / geo.scale, size=size)
            packed = pack_masks(np.asarray(mini, dtype=bool))
        else:
            packed = b""
        rpn = self.rpn_targets.compute(anchors=self.anchors, gt_boxes=gt_boxes, crowd_boxes=crowd_boxes)
        row = {
            "image_id": int(record["image_id"]),
            "file_name": record["file_name"],
            "height": height,
            "width": width,
            "scale": float(np.float32(geo.scale)),
            "window": [int(v) for v in geo.window],
            # the file as it is, or re-encoded at its own size; the loader resizes to the window
            "image": source.data if source.loader_reads else encode_image(
                source.pixels, encoding=cfg.image.encoding, quality=cfg.image.jpeg_quality),
            "gt_class_ids": np.asarray([a["category_id"] for a in kept], np.int32),
            "gt_boxes": gt_boxes.numpy().astype(np.float32).reshape(-1),  # [G, 4] -> flat
            "mini_masks": packed,
            "crowd_boxes": crowd_boxes.numpy().astype(np.float32).reshape(-1),
            "rpn_pos_idx": rpn.pos_idx.numpy().astype(np.int32),
            "rpn_pos_deltas": rpn.pos_deltas.numpy().astype(np.float32).reshape(-1),
            "rpn_ignore_idx": rpn.ignore_idx.numpy().astype(np.int32),
            "num_instances": g,
            "num_crowd": len(crowds),
            "_dropped": dropped,  # instances over roi.max_gt_instances, not stored (the largest are kept)
            "_crowd_dropped": max(0, len(crowds) - MAX_CROWD),  # stored, but past what the loader's batch holds
        }
        return row, reports


def encode_image(pixels: np.ndarray, *, encoding: str = "jpeg", quality: int = 95) -> bytes:
    """[H, W, 3] uint8 RGB -> JPEG (at `quality`) or PNG bytes of the image at its own size."""
    img = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    buf = io.BytesIO()
    if encoding == "jpeg":
        img.save(buf, "JPEG", quality=quality)
    elif encoding == "png":
        img.save(buf, "PNG")
    else:
        raise ValueError(f"image.encoding must be 'jpeg' or 'png', got {encoding!r}")
    return buf.getvalue()

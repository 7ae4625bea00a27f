"""The preprocessed shard format, schema v2 (docs/design.md, "What a shard row holds" and "The manifest").

    SHARDS/manifest.json                 written last by `pipelines.data.preprocess`: its presence marks a complete run
    SHARDS/<split>/part-*.parquet        one row per image, the columns of SHARD_SCHEMA

The reading side lives here, shared by the stages that consume shards: `read_manifest`, `check_fingerprint`
(shards made with another shard config are refused, naming the fields that differ), `shard_uris` and
`decode_row` (one row -> numpy arrays, the image decoded and resized by `pipelines.data.images`). Paths are
local paths or URIs (`s3://`, `gs://`) through pyarrow.fs.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mrcnn.config import LEGACY_SHARD_FIELDS, Config, fingerprint_diff
from mrcnn.mini_masks import unpack_masks
from mrcnn.rpn_targets import dense_rpn_targets
from pipelines.data.errors import InputError
from pipelines.data.images import ImageDecodeError, decode_resize, window_size
from pipelines.infra.storage import absolute, exists, filesystem_for, join_uri, read_file

# 2: `image` holds the source file's bytes (v1: the image resized and re-encoded); the loader resizes
SCHEMA_VERSION = 2


MANIFEST = "manifest.json"


DEFAULT_MINI_MASK_SIZE = 56
# crowd regions per image that a training batch holds for the detection-target layer's "never negative" rule (all
# are stored and used by the RPN targets); COCO images have at most a few, preprocess counts those past it
MAX_CROWD = 16


# docs/design.md schema v2, plus num_instances / num_crowd. Ragged values are plain lists with explicit counts
# (flat, 4 floats a box); no Ray tensor extension types, which have known bugs with ragged data in Parquet.
SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("height", pa.int32()),  # original image size
        ("width", pa.int32()),
        ("scale", pa.float32()),  # original -> resized
        ("window", pa.list_(pa.int32())),  # (x1, y1, x2, y2) of the image in the padded frame
        ("image", pa.binary()),  # the source file's bytes (JPEG / PNG), or re-encoded at its size; not resized
        ("gt_class_ids", pa.list_(pa.int32())),  # [G], contiguous 1..K
        ("gt_boxes", pa.list_(pa.float32())),  # [G * 4] (x1, y1, x2, y2) padded px, from the annotation's bbox
        ("mini_masks", pa.binary()),  # np.packbits of bool [G, 56, 56], C order
        ("crowd_boxes", pa.list_(pa.float32())),  # [C * 4]
        ("rpn_pos_idx", pa.list_(pa.int32())),  # [P] sorted anchor indices
        ("rpn_pos_deltas", pa.list_(pa.float32())),  # [P * 4] (dx, dy, dw, dh) / std
        ("rpn_ignore_idx", pa.list_(pa.int32())),  # [I] sorted anchor indices
        ("num_instances", pa.int32()),  # G
        ("num_crowd", pa.int32()),  # C
    ],
    metadata={"mrcnn.schema_version": str(SCHEMA_VERSION)},
)


class FingerprintMismatch(InputError):
    """Shards made with a different shard config; `fields` lists 'key: shards != config' strings."""

    def __init__(self, fields: list[str]):
        self.fields = fields
        super().__init__("shards were preprocessed with a different config; differing fields: " + "; ".join(fields))


def read_manifest(shards_uri: str) -> dict[str, Any]:
    """The manifest of a complete preprocess output; FileNotFoundError naming the folder when there is none."""
    filesystem, root = filesystem_for(absolute(shards_uri))
    path = f"{root}/{MANIFEST}"
    if not exists(filesystem, path):
        raise FileNotFoundError(f"no {MANIFEST} in {shards_uri}: not preprocessed, or the run did not finish "
                                "(rerun `mrcnn-cli preprocess`)")
    manifest = json.loads(read_file(filesystem, path))
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        why = (" (v1 shards hold resized, re-encoded images; v2 keeps the source images and resizes when loading)"
               if version == 1 else "")
        raise ValueError(f"{shards_uri}: shard schema version {version!r}, this code reads {SCHEMA_VERSION}{why}; "
                         "rerun `mrcnn-cli preprocess` (with --overwrite) to make them again")
    return manifest


def check_fingerprint(manifest: dict[str, Any], config: Config) -> None:
    """Refuse shards made with another shard config, naming each differing field (FingerprintMismatch)."""
    if manifest.get("fingerprint") == config.fingerprint():
        return
    theirs = manifest.get("shard_fields", {})
    diff = fingerprint_diff(theirs, config.shard_fields())
    if not diff and set(theirs) < set(config.shard_fields()) and set(config.shard_fields()) - set(theirs) <= set(
            LEGACY_SHARD_FIELDS):
        return  # shards written before some shard fields existed, with the values those fields have now
    raise FingerprintMismatch(diff or [f"fingerprint: {manifest.get('fingerprint')!r} != {config.fingerprint()!r}"])


def shard_uris(shards_uri: str, manifest: dict[str, Any], split: str) -> list[str]:
    """Full paths / URIs of a split's Parquet files, as listed in the manifest."""
    return [join_uri(absolute(shards_uri), f) for f in manifest["splits"][split]["files"]]


def row_image(row: dict[str, Any], device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 [3, h, w] on `device`: the row's stored image decoded and resized to its window (h = y2 - y1,
    w = x2 - x1) by `pipelines.data.images.decode_resize`. ValueError naming the image when it does not decode."""
    new_h, new_w = window_size(row["window"])
    try:
        return decode_resize(bytes(row["image"]), new_h, new_w, device)
    except ImageDecodeError as e:
        raise ValueError(f"image {row.get('image_id')} ({row.get('file_name')}) in the shards: {e}") from e


def decode_row(row: dict[str, Any], *, num_anchors: int | None = None, mini_mask_size: int | None = None,
               image: bool = True) -> dict:
    """A shard row (pyarrow `to_pylist()` dict or numpy values) -> numpy arrays, G instances, C crowd regions:

    image [h, w, 3] uint8 (resized by `row_image`, unpadded; left out when not `image`), image_id, height, width
    (original), scale float, window int64 [4];
    gt_class_ids int64 [G]; gt_boxes float32 [G, 4] (x1, y1, x2, y2) padded px; mini_masks bool [G, m, m];
    crowd_boxes float32 [C, 4]; rpn_pos_idx int64 [P]; rpn_pos_deltas float32 [P, 4]; rpn_ignore_idx int64 [I].
    With `num_anchors` also rpn_match int8 [A] (1 / 0 / -1) and rpn_deltas float32 [A, 4] (dense), after
    checking every index is below num_anchors (ValueError: shards of another anchor set).
    `mini_mask_size` defaults to the size the packed bytes imply (56 for an image without instances).
    """
    class_ids = np.asarray(row["gt_class_ids"], np.int64).reshape(-1)
    g = len(class_ids)
    packed = bytes(row["mini_masks"] or b"")
    if mini_mask_size is None:  # 3136 bits a mask at 56: the byte count gives the size back exactly
        mini_mask_size = math.isqrt(len(packed) * 8 // g) if g else DEFAULT_MINI_MASK_SIZE
    masks = unpack_masks(packed, g, mini_mask_size) if g else np.zeros((0, mini_mask_size, mini_mask_size), bool)
    out = {
        "image_id": int(row["image_id"]),
        "height": int(row["height"]),
        "width": int(row["width"]),
        "scale": float(row["scale"]),
        "window": np.asarray(row["window"], np.int64),
        "gt_class_ids": class_ids,
        "gt_boxes": np.asarray(row["gt_boxes"], np.float32).reshape(-1, 4),  # flat -> [G, 4]
        "mini_masks": np.asarray(masks, bool),
        "crowd_boxes": np.asarray(row["crowd_boxes"], np.float32).reshape(-1, 4),  # flat -> [C, 4]
        "rpn_pos_idx": np.asarray(row["rpn_pos_idx"], np.int64).reshape(-1),
        "rpn_pos_deltas": np.asarray(row["rpn_pos_deltas"], np.float32).reshape(-1, 4),  # flat -> [P, 4]
        "rpn_ignore_idx": np.asarray(row["rpn_ignore_idx"], np.int64).reshape(-1),
    }
    if image:
        out["image"] = row_image(row).permute(1, 2, 0).numpy()  # (3, h, w) -> (h, w, 3)
    if num_anchors is not None:
        for key in ("rpn_pos_idx", "rpn_ignore_idx"):
            if len(out[key]) and (out[key].min() < 0 or out[key].max() >= num_anchors):
                raise ValueError(f"{key} of image {out['image_id']} outside 0..{num_anchors - 1}: wrong anchor set?")
        match, deltas = dense_rpn_targets(num_anchors, out["rpn_pos_idx"], out["rpn_pos_deltas"],
                                          out["rpn_ignore_idx"])
        out["rpn_match"], out["rpn_deltas"] = match.numpy(), deltas.numpy()
    return out


def read_rows(shards: str, split: str, *, start: int = 0, count: int = 1, image_id: int | None = None):
    """(rows, manifest): `count` consecutive rows of a split from position `start`, or the row of `image_id`.

    Read with pyarrow row group by row group, no Ray: a picture needs a few rows, not the split.
    """


    manifest = read_manifest(shards)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} is not in {shards} (has {', '.join(manifest['splits'])})")
    files = []
    for uri in shard_uris(shards, manifest, split):
        filesystem, path = filesystem_for(uri)
        files.append(pq.ParquetFile(filesystem.open_input_file(path)))
    if image_id is not None:
        offset = 0
        for pf in files:
            ids = pf.read(columns=["image_id"]).column(0).to_pylist()
            if image_id in ids:
                start, count = offset + ids.index(image_id), 1
                break
            offset += len(ids)
        else:
            raise ValueError(f"image {image_id} is not in split {split!r} of {shards}")
    rows: list[dict[str, Any]] = []
    offset = 0
    for pf in files:
        for group in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            if offset + n > start and len(rows) < count:
                table = pf.read_row_group(group)
                first = max(start - offset, 0)
                rows.extend(table.slice(first, count - len(rows)).to_pylist())
            offset += n
    if not rows:
        raise ValueError(f"split {split!r} of {shards} has {offset} rows: no row {start}")
    return rows, manifest

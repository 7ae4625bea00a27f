"""From Parquet shards to fixed-size training batches, in Ray Data on CPUs.

Decoding each stored source image and resizing it to its window (`pipelines.data.images`, through
`mrcnn.geometry.resize_image`), mini-mask unpacking, densifying the sparse RPN targets and padding every tensor
to a fixed shape happen here, in `map_batches` on CPU workers (docs/design.md, "Ray"); a GPU training loop may
instead decode and resize the `image` bytes on its device with `pipelines.data.images.decode_canvas`. The
result is exactly the Batch of the model (mrcnn/model.py):

    images        uint8   [N, 3, S, S]   RGB, image at the top-left, zero padding
    windows       int64   [N, 4]         (x1, y1, x2, y2) of the image in the padded frame
    image_ids     int64   [N]
    scales        float32 [N]
    heights, widths int64 [N]            original image size
    gt_class_ids  int64   [N, G]         0 = padding
    gt_boxes      float32 [N, G, 4]      (x1, y1, x2, y2) padded-image pixels
    gt_mini_masks uint8   [N, G, m, m]
    crowd_boxes   float32 [N, C, 4]      zero rows = padding
    rpn_match     int8    [N, A]         1 / 0 / -1 = positive / negative / ignored
    rpn_deltas    float32 [N, A, 4]      zero except positives
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipelines.data.shards import MAX_CROWD, decode_row, row_image
from pipelines.infra.storage import filesystem_for, join_uri


class ShardBatchDecoder:
    """Callable class for `Dataset.map_batches(batch_format="numpy")`: shard rows -> padded batch arrays."""

    def __init__(self, *, image_size: int, max_instances: int, mini_mask_size: int, num_anchors: int):
        self.image_size = image_size
        self.max_instances = max_instances
        self.mini_mask_size = mini_mask_size
        self.num_anchors = num_anchors

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(rows["image_id"])
        s, g, m, a = self.image_size, self.max_instances, self.mini_mask_size, self.num_anchors
        out = {
            "images": np.zeros((n, 3, s, s), np.uint8),
            "windows": np.zeros((n, 4), np.int64),
            "image_ids": np.asarray(rows["image_id"], np.int64),
            "scales": np.asarray(rows["scale"], np.float32),
            "heights": np.asarray(rows["height"], np.int64),
            "widths": np.asarray(rows["width"], np.int64),
            "gt_class_ids": np.zeros((n, g), np.int64),
            "gt_boxes": np.zeros((n, g, 4), np.float32),
            "gt_mini_masks": np.zeros((n, g, m, m), np.uint8),
            "crowd_boxes": np.zeros((n, MAX_CROWD, 4), np.float32),
            "rpn_match": np.zeros((n, a), np.int8),
            "rpn_deltas": np.zeros((n, a, 4), np.float32),
        }
        for i in range(n):
            raw = {k: v[i] for k, v in rows.items()}
            row = decode_row(raw, num_anchors=a, mini_mask_size=m, image=False)
            image = row_image(raw).numpy()  # [3, h, w] uint8, unpadded, resized to the window
            x1, y1 = int(row["window"][0]), int(row["window"][1])
            out["images"][i, :, y1 : y1 + image.shape[1], x1 : x1 + image.shape[2]] = image
            out["windows"][i] = row["window"]
            k = min(len(row["gt_class_ids"]), g)
            out["gt_class_ids"][i, :k] = row["gt_class_ids"][:k]
            out["gt_boxes"][i, :k] = row["gt_boxes"][:k]
            out["gt_mini_masks"][i, :k] = row["mini_masks"][:k]
            crowd = row["crowd_boxes"][:MAX_CROWD]
            out["crowd_boxes"][i, : len(crowd)] = crowd
            out["rpn_match"][i] = row["rpn_match"]
            out["rpn_deltas"][i] = row["rpn_deltas"]
        return out


def decoder_for(config: Any, num_anchors: int) -> dict[str, Any]:
    """`fn_constructor_kwargs` for ShardBatchDecoder from a Config."""
    return {
        "image_size": config.image.max_dim,
        "max_instances": config.roi.max_gt_instances,
        "mini_mask_size": config.mask.mini_mask_size,
        "num_anchors": num_anchors,
    }


def read_split(shards: str, split: str, *, override_num_blocks: int | None = None):
    """The split's Parquet shards as a Ray Data dataset (lazy, streamed)."""
    import ray.data

    # the filesystem resolved here and handed over: Ray Data would keep a URI's query (s3 options such as
    # endpoint_override) in the object key
    filesystem, path = filesystem_for(join_uri(shards, split))
    return ray.data.read_parquet(path, filesystem=filesystem, override_num_blocks=override_num_blocks)


def batches_dataset(shards: str, split: str, config: Any, num_anchors: int, *, decode_batch_size: int = 4):
    """Shards -> a dataset of decoded, fixed-shape rows (what `iter_torch_batches` then stacks)."""
    ds = read_split(shards, split)
    # stateless tasks, not an actor pool: the decoder has nothing to set up, and tasks run in Ray's reused
    # worker processes, so each epoch's new stream does not pay an actor start (a torch import) again
    return ds.map_batches(
        decode_batch,
        fn_kwargs=decoder_for(config, num_anchors),
        batch_size=decode_batch_size,
        batch_format="numpy",
        num_cpus=0.5,
    )


def decode_batch(rows: dict[str, np.ndarray], **decoder_kwargs: Any) -> dict[str, np.ndarray]:
    """Function form of ShardBatchDecoder for task-based `map_batches`."""
    return ShardBatchDecoder(**decoder_kwargs)(rows)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

"""From Parquet shards to fixed-size training batches, in Ray Data on CPUs.

Decoding each stored source image and resizing it to its window (`pipelines.data.images`, through
`mrcnn.geometry.resize_image`), mini-mask unpacking, the RPN labels and padding every tensor to a fixed shape
happen here, in `map_batches` on CPU workers (docs/design.md, "Ray"); a GPU training loop may instead decode and
resize the `image` bytes on its device with `pipelines.data.images.decode_canvas`. The positives' RPN deltas
travel sparse (K = rpn.anchors_per_image an image: 6 KB, not 1 MB of mostly zeros at 1024 px) and
`densify_rpn_deltas` makes them dense on the training device. After it the batch is exactly the Batch of the
model (mrcnn/model.py):

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
    rpn_deltas    float32 [N, A, 4]      zero except positives (made on the device by densify_rpn_deltas from
    rpn_pos_idx   int64   [N, K]         the positive anchors, -1 = padding, and
    rpn_pos_deltas float32 [N, K, 4]     their deltas, as the decoder ships them)

An image with more than K positive anchors keeps K of them, drawn with a seed of its image id, and the others
are ignored (-1): the RPN loss samples at most rpn.anchors_per_image x rpn.positive_fraction <= K positives a step
uniformly, so it draws them from a uniform subset instead of from all (`ShardBatchDecoder.max_positives`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch

from mrcnn.rpn_targets import scatter_positive_deltas
from pipelines.data.shards import MAX_CROWD, check_anchor_indices, decode_row, row_image
from pipelines.data.shardset import ShardSet


class ShardBatchDecoder:
    """Callable class for `Dataset.map_batches(batch_format="numpy")`: shard rows -> padded batch arrays."""

    def __init__(self, *, image_size: int, max_instances: int, mini_mask_size: int, num_anchors: int,
                 max_positives: int):
        self.image_size = image_size
        self.max_instances = max_instances
        self.mini_mask_size = mini_mask_size
        self.num_anchors = num_anchors
        self.max_positives = max_positives  # K: positive anchors shipped an image (the sparse deltas' length)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(rows["image_id"])
        s, g, m, a = self.image_size, self.max_instances, self.mini_mask_size, self.num_anchors
        p = self.max_positives
        out = {
            "images": np.zeros((n, 3, s, s), np.uint8),
            "windows": np.zeros((n, 4), np.int64),
            "image_ids": np.array(rows["image_id"], np.int64),  # copies: Arrow's arrays are read-only
            "scales": np.array(rows["scale"], np.float32),
            "heights": np.array(rows["height"], np.int64),
            "widths": np.array(rows["width"], np.int64),
            "gt_class_ids": np.zeros((n, g), np.int64),
            "gt_boxes": np.zeros((n, g, 4), np.float32),
            "gt_mini_masks": np.zeros((n, g, m, m), np.uint8),
            "crowd_boxes": np.zeros((n, MAX_CROWD, 4), np.float32),
            "rpn_match": np.zeros((n, a), np.int8),
            "rpn_pos_idx": np.full((n, p), -1, np.int64),
            "rpn_pos_deltas": np.zeros((n, p, 4), np.float32),
        }
        for i in range(n):
            raw = {key: v[i] for key, v in rows.items()}
            row = decode_row(raw, mini_mask_size=m, image=False)
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
            out["rpn_match"][i], pos_idx, pos_deltas = rpn_labels(row, num_anchors=a, max_positives=p)
            out["rpn_pos_idx"][i, : len(pos_idx)] = pos_idx
            out["rpn_pos_deltas"][i, : len(pos_idx)] = pos_deltas
        return out


def rpn_labels(row: dict[str, Any], *, num_anchors: int, max_positives: int) -> tuple[np.ndarray, np.ndarray,
                                                                                        np.ndarray]:
    """One decoded row's RPN targets as the batch ships them: (match int8 [A] 1 / 0 / -1, the kept positives'
    anchor indices int64 [P'] sorted, their deltas float32 [P', 4]), P' = min(P, max_positives); the positives
    past max_positives (a uniform draw seeded by the image id) become ignored. ValueError for an index outside
    the anchors (shards of another anchor set)."""
    pos_idx, pos_deltas, ignore_idx = row["rpn_pos_idx"], row["rpn_pos_deltas"], row["rpn_ignore_idx"]
    check_anchor_indices(row, num_anchors)
    match = np.zeros(num_anchors, np.int8)
    match[ignore_idx] = -1
    if len(pos_idx) > max_positives:
        rng = np.random.default_rng(int(row["image_id"]) % 2**64)
        keep = np.sort(rng.choice(len(pos_idx), max_positives, replace=False))
        match[pos_idx] = -1  # the positives left out are neither positive nor negative
        pos_idx, pos_deltas = pos_idx[keep], pos_deltas[keep]
    match[pos_idx] = 1
    return match, pos_idx, pos_deltas


def densify_rpn_deltas(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch with the decoder's sparse RPN deltas (`rpn_pos_idx`, `rpn_pos_deltas`) -> the model's Batch with
    dense `rpn_deltas` [N, A, 4], on the batch's device and without a host sync; a batch without them (already
    dense, or for inference) is returned as it is."""
    if "rpn_pos_idx" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k not in ("rpn_pos_idx", "rpn_pos_deltas")}
    out["rpn_deltas"] = scatter_positive_deltas(batch["rpn_match"].shape[1], batch["rpn_pos_idx"],
                                                batch["rpn_pos_deltas"])
    return out


def decoder_for(config: Any, num_anchors: int) -> dict[str, Any]:
    """`fn_constructor_kwargs` for ShardBatchDecoder from a Config."""
    return {
        "image_size": config.image.max_dim,
        "max_instances": config.roi.max_gt_instances,
        "mini_mask_size": config.mask.mini_mask_size,
        "num_anchors": num_anchors,
        # at least the positives the RPN loss samples a step (anchors_per_image x positive_fraction)
        "max_positives": config.rpn.anchors_per_image,
    }


def batches_dataset(shards: ShardSet, split: str, config: Any, num_anchors: int, *, decode_batch_size: int = 4,
                    image_ids: frozenset[int] | None = None):
    """A split of the shard set -> a dataset of decoded, fixed-shape rows (what `iter_torch_batches` then stacks);
    only the rows of `image_ids` when given (left out before they are decoded)."""
    from pipelines.infra.ray_env import one_node_task_concurrency

    ds = shards.dataset(split)
    if image_ids is not None:
        ds = ds.filter(partial(_row_in, ids=image_ids))
    # stateless tasks, not an actor pool: the decoder has nothing to set up, and tasks run in Ray's reused
    # worker processes, so each epoch's new stream does not pay an actor start (a torch import) again
    return ds.map_batches(
        decode_batch,
        fn_kwargs=decoder_for(config, num_anchors),
        batch_size=decode_batch_size,
        batch_format="numpy",
        num_cpus=0.5,
        concurrency=one_node_task_concurrency(),
    )


def _row_in(row: dict[str, Any], *, ids: frozenset[int]) -> bool:
    return int(row["image_id"]) in ids


def decode_batch(rows: dict[str, np.ndarray], **decoder_kwargs: Any) -> dict[str, np.ndarray]:
    """Function form of ShardBatchDecoder for task-based `map_batches`."""
    return ShardBatchDecoder(**decoder_kwargs)(rows)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

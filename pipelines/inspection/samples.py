"""The image an inspect picture shows (`Sample`): one shard row, from the shards or made by `RowMaker` from a
COCO split, with its decoded targets, the one-image batch the model sees and the original COCO record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from mrcnn.anchors import anchors_from_config
from mrcnn.config import Config
from mrcnn.mini_masks import expand_masks, mini_mask_boxes
from pipelines.data.categories import CategoryMap
from pipelines.data.coco import load_image_rgb, read_split, split_paths
from pipelines.data.errors import DatasetError, InputError
from pipelines.data.loader import ShardBatchDecoder, decoder_for, densify_rpn_deltas
from pipelines.data.rows import RowMaker
from pipelines.data.shards import decode_row
from pipelines.data.shardset import ShardSet


@dataclass
class Sample:
    """One image and its targets, exactly as a shard row holds them.

    raw: the row (SHARD_SCHEMA columns) as read from the shards or made by RowMaker; row: `decode_row(raw)` with
    dense rpn_match / rpn_deltas; annotations / images_root: where the original COCO record lives.
    """

    config: Config
    categories: CategoryMap
    raw: dict[str, Any]
    source: str
    annotations: str | None = None
    images_root: str | None = None
    record: dict[str, Any] | None = field(default=None, repr=False)

    @cached_property
    def anchors(self) -> torch.Tensor:
        return anchors_from_config(self.config)  # [A, 4]

    @cached_property
    def row(self) -> dict[str, Any]:
        return decode_row(self.raw, num_anchors=len(self.anchors), mini_mask_size=self.config.mask.mini_mask_size)

    @property
    def size(self) -> int:
        return self.config.image.max_dim

    @property
    def image_id(self) -> int:
        return int(self.row["image_id"])

    @cached_property
    def canvas(self) -> np.ndarray:
        """[S, S, 3] uint8: the stored image at the top-left of the zero canvas, as the model sees it."""
        image = self.row["image"]
        out = np.zeros((self.size, self.size, 3), np.uint8)
        out[: image.shape[0], : image.shape[1]] = image
        return out

    @cached_property
    def gt_masks(self) -> np.ndarray:
        """[G, S, S] bool: the mini-masks expanded into their mini boxes."""
        return expanded_masks(self.row["mini_masks"], self.row["gt_boxes"], self.size)

    @property
    def labels(self) -> list[str]:
        return [self.categories.name(c) for c in self.row["gt_class_ids"]]

    def batch(self) -> dict[str, torch.Tensor]:
        """A one-image batch (docs/design.md, "The training batch") from this row, through the loader's own decoder."""

        decoder = ShardBatchDecoder(**decoder_for(self.config, len(self.anchors)))
        decoded = decoder({k: [v] for k, v in self.raw.items()})
        return densify_rpn_deltas({k: torch.as_tensor(v) for k, v in decoded.items()})

    def coco_record(self) -> dict[str, Any]:
        """The image's record in the original COCO split (original-resolution annotations)."""
        if self.record is None:

            if not self.annotations:
                raise InputError(f"{self.source}: no annotations file recorded, cannot read the original masks")
            source = read_split(self.annotations, self.images_root or "")
            found = [r for r in source.records if r["image_id"] == self.image_id]
            if not found:
                raise InputError(f"image {self.image_id} is not in {self.annotations}")
            self.record = found[0]
        return self.record

    def original_image(self) -> np.ndarray | None:
        """[H, W, 3] uint8 original image of the COCO record, or None when it cannot be read."""

        try:
            return load_image_rgb(self.coco_record()["path"])
        except DatasetError:
            return None


def expanded_masks(mini: np.ndarray, gt_boxes: np.ndarray, size: int) -> np.ndarray:
    """mini [G, m, m] bool, gt_boxes [G, 4] -> [G, size, size] bool, each pasted into its mini box."""

    if not len(gt_boxes):
        return np.zeros((0, size, size), bool)
    boxes = mini_mask_boxes(torch.as_tensor(gt_boxes))
    return expand_masks(torch.as_tensor(np.asarray(mini)), boxes, size, size).numpy()


def load_sample(*, shards: ShardSet | None = None, dataset: str | None = None, split: str = "val2017",
                image_id: int | None = None, index: int = 0, config: Config | None = None) -> Sample:
    """The image to inspect: from the shards (their config, unless `config` is given: a model's, checked to
    share the shards' geometry by the caller) or from a COCO split processed by RowMaker with `config`."""
    if shards:
        rows = shards.read_rows(split, start=index, image_id=image_id)
        info = shards.split(split)
        return Sample(config or Config.from_dict(shards.manifest["config"]), CategoryMap.from_dict(shards.categories),
                      rows[0], f"shards {shards.uri} [{split}]", info.get("annotations"), info.get("images_root"))
    if not dataset:
        raise InputError("give --shards SHARDS or --dataset DATASET (with --split)")

    config = config or Config()
    annotations, images_root = split_paths(dataset, split)
    source = read_split(annotations, images_root)
    if image_id is not None:
        records = [r for r in source.records if r["image_id"] == image_id]
        if not records:
            raise InputError(f"image {image_id} is not in {annotations}")
    else:
        if not 0 <= index < len(source.records):
            raise InputError(f"--index {index}: {annotations} has {len(source.records)} images")
        records = [source.records[index]]
    raw, reports = RowMaker(config.to_dict(), torch_threads=None).make(records[0])
    if raw is None:
        raise InputError(f"image {records[0]['image_id']} cannot be processed: {reports}")
    return Sample(config, source.categories, raw, f"dataset {dataset} [{split}]", annotations, images_root, records[0])


def describe(sample: Sample) -> str:
    r = sample.row
    return (f"image {sample.image_id} ({r['width']}x{r['height']} px, scale {r['scale']:.3f}, "
            f"window {tuple(int(v) for v in r['window'])})\nfrom {sample.source}")

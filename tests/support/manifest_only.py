"""A shards folder holding only a manifest: enough for a command to get as far as its checks on the driver
(weights, model sources, settings against the model) before Ray starts or a shard is read."""

from __future__ import annotations

import json
from pathlib import Path

from mrcnn.config import Config, shapes
from pipelines.data.categories import CategoryMap
from pipelines.data.shards import SCHEMA_VERSION


def manifest_only_shards(folder: Path, *, split: str = "train2017", categories: CategoryMap | None = None,
                         config: Config | None = None) -> Path:
    """`folder`/shards with the manifest of `config` (default the shapes preset): one 4-image split `split`, the
    categories given (default two: 1 circle, 3 square)."""
    config = config or shapes()
    categories = categories or CategoryMap((1, 3), ("circle", "square"))
    shards = folder / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "fingerprint": config.fingerprint(), "shard_fields": config.shard_fields(),
        "splits": {split: {"num_images": 4}}, "categories": categories.to_dict()}))
    return shards

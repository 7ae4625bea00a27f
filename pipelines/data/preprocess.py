"""`mrcnn-cli preprocess`: COCO-format splits -> Parquet shards + manifest.json, in Ray Data on CPUs.

    manifest_uri = preprocess(coco(), splits=[("train2017", ann_json, images_dir)], out="s3://bucket/shards")

The annotations are read and checked once on the driver (`pipelines.data.coco.read_split`, pycocotools).
Their image records become ONE Ray Data dataset over all splits; an autoscaling pool of `RowMaker` actors
(one CPU each, up to every CPU of the cluster) turns each record into one shard row (docs/design.md, "What a
shard row holds", schema v2): the source file's bytes (not resized: the reader resizes), contiguous class ids,
and in the resized frame gt boxes, bit-packed mini-masks, crowd boxes and sparse RPN targets from the model's
own `compute_rpn_targets`. A `ShardDatasink` (`data/datasink.py`) streams the rows into
`<split>/part-*.parquet` files in the write tasks and hands back only counts and skip reports, so the driver never
holds image rows and memory stays flat whatever the dataset size.

Bad input never stops the run: what `read_split` refuses (duplicate ids, unsafe paths, unknown categories,
degenerate polygons, bad boxes, ...) and what the workers find (missing, empty, corrupt or wrongly sized
image files) is skipped, counted and listed in the manifest with image id, file and reason.

Publishing is atomic at the manifest: everything is written under `OUT/.tmp-<uuid>/`, moved into place, and
`manifest.json` comes last (temporary name, then a rename). An output without a manifest is incomplete;
`ShardSet.open` refuses it and a rerun replaces it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from pyarrow import fs as pafs
from ray.data import ActorPoolStrategy, DataContext

from mrcnn.anchors import anchors_from_config
from mrcnn.config import Config
from pipelines.data.categories import CategoryMap
from pipelines.data.coco import SplitSource, read_split
from pipelines.data.datasink import ShardDatasink
from pipelines.data.errors import DatasetError, InputError
from pipelines.data.rows import RowMaker
from pipelines.data.shards import (
    MANIFEST,
    MAX_CROWD,
    SCHEMA_VERSION,
    SHARD_SCHEMA,
)
from pipelines.infra.context import RunContext
from pipelines.infra.logs import get_logger
from pipelines.infra.ray_env import usable_cpus
from pipelines.infra.storage import absolute, exists, filesystem_for, is_uri, join_uri, read_file, replace_file

log = get_logger("preprocess")

BATCH_SIZE = 8  # records per map_batches call: small, so a few slow images do not hold up a whole block


MAX_INPUT_BLOCKS = 2000

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class OutputExistsError(InputError, FileExistsError):
    """The output already holds a complete preprocess run (a manifest) and overwrite was not asked for."""


def _move_dir(filesystem: pafs.FileSystem, src: str, dst: str) -> None:
    """Rename a folder; object stores cannot, so there each file is moved (copy + delete) instead."""
    try:
        filesystem.move(src, dst)
        return
    except (OSError, NotImplementedError, pa.ArrowNotImplementedError):
        pass
    for info in filesystem.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            filesystem.move(info.path, dst + info.path[len(src):])
    filesystem.delete_dir(src)


def _delete(filesystem: pafs.FileSystem, path: str) -> None:
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        filesystem.delete_dir(path)
    elif info.type == pafs.FileType.File:
        filesystem.delete_file(path)


@dataclass(frozen=True)
class _Split:
    name: str
    annotations: str
    images_root: str
    training: bool


def _skip_sort_key(entry: dict[str, Any]) -> tuple:
    def num(v):
        return (0, v, "") if isinstance(v, int) else (1, 0, repr(v))

    return (num(entry.get("image_id")), num(entry.get("annotation_id")), entry.get("reason", ""))


def preprocess(
    config: Config,
    *,
    splits: list[tuple[str, str, str]],
    out: str,
    overwrite: bool = False,
    train_splits: set[str] | None = None,
    progress: bool = True,
    ctx: RunContext | None = None,
    max_workers: int | None = None,
) -> str:
    """Preprocess `splits` [(name, annotations JSON, images folder)] into `out` (local path or URI).

    Training splits (`train_splits`, default: names starting with "train") drop images without instances
    when `config.preprocess.drop_empty_train`; evaluation splits keep them; both count them. Raises
    OutputExistsError if `out` holds a manifest and not `overwrite`, DatasetError (before any work) for a
    missing or malformed annotations file. Uses the running Ray, else starts it through `ctx` (default:
    `RunContext()`: RAY_ADDRESS, else a local Ray). `max_workers` caps the actor pool (default: every CPU of the
    cluster).
    Returns the manifest's path / URI.
    """

    plan = _plan(config, splits, train_splits)
    out = absolute(out)
    filesystem, root = filesystem_for(out)
    manifest_path = f"{root}/{MANIFEST}"
    if exists(filesystem, manifest_path) and not overwrite:
        raise OutputExistsError(f"{out} already holds a complete preprocess output ({MANIFEST}); "
                                "pass overwrite=True (--overwrite) to replace it")

    sources, categories = _read_sources(plan)
    items, dropped_empty = _work_items(plan, sources, drop_empty_train=config.preprocess.drop_empty_train)

    (ctx or RunContext()).start_ray()

    started = time.time()
    if not is_uri(out) and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        log.warning("%s is a local path on a multi-node cluster; every node writes its own disk unless it is a "
                    "shared filesystem (use s3:// or gs://)", out)
    _clear_output(filesystem, root, manifest_path, overwrite=overwrite)
    tmp_name = f".tmp-{uuid.uuid4().hex[:12]}"
    tmp_root = join_uri(out, tmp_name)
    filesystem.create_dir(f"{root}/{tmp_name}", recursive=True)

    written: dict[str, dict[str, Any]] = {}
    if items:
        written = _run(ray, config, items, tmp_root, progress=progress, max_workers=max_workers)

    # Publish: split folders first, the manifest last (temporary name, then rename).
    for s in plan:
        _delete(filesystem, f"{root}/{s.name}")
        src = f"{root}/{tmp_name}/{s.name}"
        if exists(filesystem, src):
            _move_dir(filesystem, src, f"{root}/{s.name}")
        else:
            filesystem.create_dir(f"{root}/{s.name}", recursive=True)
    manifest = _manifest(config, plan, sources, written, dropped_empty, categories, time.time() - started)
    replace_file(filesystem, manifest_path, json.dumps(manifest, indent=1, sort_keys=False).encode())
    _delete(filesystem, f"{root}/{tmp_name}")
    _log_summary(manifest, plan, config, progress=progress)
    return join_uri(out, MANIFEST)


def _plan(config: Config, splits: list[tuple[str, str, str]], train_splits: set[str] | None) -> list[_Split]:
    """The settings and split names checked (ValueError naming what is wrong) -> one `_Split` a split, its paths
    made absolute, training or not (`train_splits`, default: names starting with "train")."""
    if config.image.resize_mode != "square":
        raise ValueError(f"image.resize_mode {config.image.resize_mode!r}: only 'square' (resize, pad to max_dim)")
    if config.image.encoding not in ("jpeg", "png"):
        raise ValueError(f"image.encoding {config.image.encoding!r}: 'jpeg' or 'png'")
    names = [s[0] for s in splits]
    if not splits:
        raise ValueError("preprocess: no splits given")
    for name in names:
        if not _SPLIT_NAME.match(name):
            raise ValueError(f"split name {name!r}: letters, digits, '_', '.', '-' only, not starting with '.'")
    if len(set(names)) != len(names):
        raise ValueError(f"split names repeat: {names}")
    is_train = (lambda n: n in train_splits) if train_splits is not None else (lambda n: n.startswith("train"))
    return [_Split(n, absolute(a), absolute(i), is_train(n)) for n, a, i in splits]


def _read_sources(plan: list[_Split]) -> tuple[dict[str, SplitSource], CategoryMap]:
    """Every annotations file read and checked before any image work (a bad file fails here, fast) -> the splits'
    sources by name, their categories (DatasetError when two splits' differ)."""
    sources = {s.name: read_split(s.annotations, s.images_root) for s in plan}
    categories = sources[plan[0].name].categories
    for s in plan[1:]:
        if sources[s.name].categories != categories:
            raise DatasetError(f"split {s.name!r} has other categories than {plan[0].name!r}: "
                               "contiguous class ids would not agree")
    return sources, categories


def _work_items(plan: list[_Split], sources: dict[str, SplitSource], *, drop_empty_train: bool
                ) -> tuple[list[dict[str, str]], dict[str, list[int]]]:
    """The Ray Data job's input, {"split", "record" (JSON)} per image in image id order, and the ids of the
    training splits' images dropped for having no instance (crowds do not count) under `drop_empty_train`, by
    split. The sources' records and pycocotools index are freed (the manifest needs only their counts)."""
    items, dropped_empty = [], {}
    for s in plan:
        source = sources[s.name]
        source.coco = None  # the pycocotools index is not needed here; free it
        dropped = []
        for record in sorted(source.records, key=lambda r: r["image_id"]):
            if s.training and drop_empty_train and not any(not a["iscrowd"] for a in record["annotations"]):
                dropped.append(record["image_id"])
                continue
            items.append({"split": s.name, "record": json.dumps(record)})
        dropped_empty[s.name] = dropped
        source.records = []
    return items, dropped_empty


def _clear_output(filesystem: pafs.FileSystem, root: str, manifest_path: str, *, overwrite: bool) -> None:
    """Before a run writes: with `overwrite`, the old output's manifest (first: from here on it no longer looks
    complete) and the split folders it made; any `.tmp-*` folder an interrupted run left."""
    if overwrite and exists(filesystem, manifest_path):
        old = json.loads(read_file(filesystem, manifest_path) or b"{}")  # any schema version: it is being replaced
        filesystem.delete_file(manifest_path)  # from here on the old output no longer looks complete
        for name in old.get("splits", {}):
            if isinstance(name, str) and _SPLIT_NAME.match(name):  # only folders the old run made
                _delete(filesystem, f"{root}/{name}")
    for info in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.base_name.startswith(".tmp-"):  # left by an interrupted run
            _delete(filesystem, info.path)


def _log_summary(manifest: dict[str, Any], plan: list[_Split], config: Config, *, progress: bool) -> None:
    """Each split's counts (with `progress`), and a warning for instances or crowds past what a row keeps."""
    for s in plan:
        m = manifest["splits"][s.name]
        if progress:
            log.info("%s: %d images, %d instances, %d skip reports, %d file(s)", s.name, m["num_images"],
                     m["num_instances"], len(m["skipped"]), len(m["files"]))
        if m["instances_over_limit"]:
            log.warning("%s: %d images have more than roi.max_gt_instances=%d instances: %d instances were left out "
                        "(the largest are kept; manifest: instances_over_limit)", s.name, m["images_over_limit"],
                        config.roi.max_gt_instances, m["instances_over_limit"])
        if m["crowd_over_limit"]:
            log.warning("%s: %d images have more than %d crowd regions: the detection-target layer sees the first "
                        "%d of each, %d regions in all are past it (manifest: crowd_over_limit)", s.name,
                        m["images_crowd_over_limit"], MAX_CROWD, MAX_CROWD, m["crowd_over_limit"])


def _run(ray: Any, config: Config, items: list[dict[str, str]], tmp_root: str, *, progress: bool,
         max_workers: int | None) -> dict[str, dict[str, Any]]:
    """Run the Ray Data job over every split's records; returns the datasink's merged per-split result."""

    cpus = usable_cpus()
    workers = max(1, min(max_workers or cpus, cpus))
    blocks = max(1, min(MAX_INPUT_BLOCKS, math.ceil(len(items) / BATCH_SIZE)))
    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = progress
    try:
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            RowMaker,
            fn_constructor_kwargs={"config": config.to_dict()},
            batch_size=BATCH_SIZE,
            batch_format="numpy",
            # all workers from the start: the job is CPU-bound and its size known; scaling up from one actor
            # waits for the pool to look busy first
            compute=ActorPoolStrategy(min_size=1, max_size=workers, initial_size=min(workers, blocks)),
            num_cpus=1,
        )
        sink = ShardDatasink(tmp_root, rows_per_shard=config.preprocess.rows_per_shard,
                             rows_per_row_group=config.preprocess.rows_per_row_group)
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})  # writes are I/O: leave the CPUs to the actors
    finally:
        ctx.enable_progress_bars = saved
    return sink.result


# reasons that concern one annotation, reported even when the annotation has no (usable) id
ANNOTATION_REASONS = frozenset({
    "skipped_image", "missing_image_record", "malformed_annotation", "duplicate_annotation_id", "unknown_category",
    "degenerate_polygon", "malformed_segmentation", "zero_area_box", "box_outside_image", "bbox_clipped",
    "area_recomputed"})


def skipped_images(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reports that skip a whole image: no annotation id, action "skipped", and a reason about the image (an
    annotation without an id is reported with annotation_id None too, and is no skipped image)."""
    return [e for e in reports if e.get("annotation_id") is None and e.get("action") == "skipped"
            and e.get("reason", "").split(":", 1)[0] not in ANNOTATION_REASONS]


def _manifest(config: Config, plan: list[_Split], sources: dict[str, Any], written: dict[str, dict[str, Any]],
              dropped_empty: dict[str, list[int]], categories: Any, seconds: float) -> dict[str, Any]:
    splits = {}
    for s in plan:
        source, w = sources[s.name], written.get(s.name, {})
        skipped = sorted([*source.skipped, *w.get("reports", [])], key=_skip_sort_key)
        image_skips = skipped_images(skipped)
        empty_kept = int(w.get("num_empty", 0))
        splits[s.name] = {
            "annotations": s.annotations,
            "annotations_sha256": source.annotations_sha256,
            "images_root": s.images_root,
            "training": s.training,
            "files": sorted(w.get("files", [])),
            "num_images": int(w.get("num_images", 0)),
            "num_instances": int(w.get("num_instances", 0)),
            "num_crowd": int(w.get("num_crowd", 0)),
            "num_images_source": source.num_images_total,
            "num_annotations_source": source.num_annotations_total,
            "empty_images": {"kept": empty_kept, "dropped": len(dropped_empty[s.name]),
                             "dropped_ids": dropped_empty[s.name]},
            # instances past roi.max_gt_instances (not stored: the largest are kept) and crowd regions past the
            # loader's MAX_CROWD (stored, used by the RPN targets, past what the detection-target layer sees)
            "instances_over_limit": int(w.get("instances_over_limit", 0)),
            "images_over_limit": int(w.get("images_over_limit", 0)),
            "crowd_over_limit": int(w.get("crowd_over_limit", 0)),
            "images_crowd_over_limit": int(w.get("images_crowd_over_limit", 0)),
            "num_skipped_images": len(image_skips),
            "skip_counts": dict(sorted(Counter(e["reason"].split(":")[0] for e in skipped).items())),
            "skipped": skipped,
        }
    data_hash = hashlib.sha256(json.dumps(
        [config.fingerprint()] + [splits[s.name]["annotations_sha256"] for s in plan]).encode()).hexdigest()[:16]

    return {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 2),
        "config": config.to_dict(),
        "fingerprint": config.fingerprint(),
        "shard_fields": config.shard_fields(),
        "data_fingerprint": data_hash,
        "num_anchors": int(anchors_from_config(config).shape[0]),
        "columns": {f.name: str(f.type) for f in SHARD_SCHEMA},
        "categories": {**categories.to_dict(), "coco_ids": list(categories.coco_ids),
                       "names": list(categories.names), "num_classes": categories.num_classes},
        "splits": splits,
    }

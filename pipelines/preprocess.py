"""`mrcnn-cli preprocess`: COCO-format splits -> Parquet shards + manifest.json, in Ray Data on CPUs.

    manifest_uri = preprocess(coco(), splits=[("train2017", ann_json, images_dir)], out="s3://bucket/shards")

The annotations are read and checked once on the driver (`pipelines.coco_source.read_split`, pycocotools).
Their image records become ONE Ray Data dataset over all splits; an autoscaling pool of `RowMaker` actors
(one CPU each, up to every CPU of the cluster) turns each record into one shard row (DESIGN.md, "What a
shard row holds", schema v1): the decoded image resized and re-encoded, contiguous class ids, gt boxes from
the annotation's `bbox`, bit-packed mini-masks, crowd boxes and sparse RPN targets from the model's own
`compute_rpn_targets`. A `ShardDatasink` streams the rows into `<split>/part-*.parquet` files in the write
tasks and hands back only counts and skip reports, so the driver never holds image rows and memory stays
flat whatever the dataset size.

Bad input never stops the run: what `read_split` refuses (duplicate ids, unsafe paths, unknown categories,
degenerate polygons, bad boxes, ...) and what the workers find (missing, empty, corrupt or wrongly sized
image files) is skipped, counted and listed in the manifest with image id, file and reason.

Publishing is atomic at the manifest: everything is written under `OUT/.tmp-<uuid>/`, moved into place, and
`manifest.json` comes last (temporary name, then a rename). An output without a manifest is incomplete;
`read_manifest` refuses it and a rerun replaces it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pyarrow import fs as pafs
from ray.data import Datasink

from mrcnn.config import Config
from pipelines.shards import (  # noqa: F401 - re-exported: the stages import the reading side from here too
    MANIFEST,
    SCHEMA_VERSION,
    SHARD_SCHEMA,
    FingerprintMismatch,
    absolute,
    check_fingerprint,
    decode_row,
    exists,
    filesystem_for,
    join_uri,
    read_manifest,
    shard_uris,
)

BATCH_SIZE = 8  # records per map_batches call: small, so a few slow images do not hold up a whole block
MAX_INPUT_BLOCKS = 2000

# What the workers emit: the shard columns (null for a skipped image) plus bookkeeping the datasink strips.
_WORK_SCHEMA = pa.schema(
    list(SHARD_SCHEMA.remove_metadata())
    + [("_split", pa.string()), ("_ok", pa.bool_()), ("_reports", pa.string()), ("_dropped", pa.int32())]
)
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class OutputExistsError(FileExistsError):
    """The output already holds a complete preprocess run (a manifest) and overwrite was not asked for."""


# ---------------------------------------------------------------------------------------------- one image


def _image_error_reason(error: Exception) -> str:
    """Stable slug + detail for an ImageError raised by `load_image_rgb` (its messages name the cause)."""
    msg = str(error)
    for prefix, slug in (
        ("image file not found", "missing_image"),
        ("empty image file", "empty_image_file"),
        ("not a recognised image", "corrupt_image"),
        ("truncated or corrupt", "corrupt_image"),
        ("cannot read image", "unreadable_image"),
    ):
        if msg.startswith(prefix):
            return f"{slug}: {msg}"
    return f"bad_image: {msg}"


def _skip(record: dict[str, Any], reason: str, annotation_id: int | None = None, action: str = "skipped") -> dict:
    return {"image_id": record.get("image_id"), "file": record.get("file_name"), "annotation_id": annotation_id,
            "reason": reason, "action": action}


class RowMaker:
    """One COCO image record -> one shard row. Also the callable class of `map_batches` (set up once per actor).

    `make(record)` returns (row or None, reports): row holds the SHARD_SCHEMA columns as Python / numpy values;
    reports are skip entries ({"image_id", "file", "annotation_id", "reason", "action"}) for the image (when
    row is None) or for single annotations dropped here.
    """

    def __init__(self, config: dict[str, Any], *, torch_threads: int | None = 1):
        import torch

        from mrcnn.anchors import anchors_from_config

        if torch_threads:
            torch.set_num_threads(torch_threads)  # one actor per CPU: intra-op threads would only oversubscribe
        self.config = Config.from_dict(config)
        self.anchors = anchors_from_config(self.config)  # [A, 4] padded px, built once per actor

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
        return pa.Table.from_pydict(columns, schema=_WORK_SCHEMA)

    # ------------------------------------------------------------------ one record
    def make(self, record: dict[str, Any]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        import torch

        from mrcnn.geometry import coco_bbox_to_box, resize_geometry
        from mrcnn.mini_masks import mini_mask_boxes, minimize_masks, pack_masks
        from mrcnn.rpn_targets import compute_rpn_targets
        from pipelines.coco_source import ImageError, annotation_mask, load_image_rgb

        cfg = self.config
        height, width = int(record["height"]), int(record["width"])
        try:
            pixels = load_image_rgb(record["path"])  # [H, W, 3] uint8 RGB (grayscale / CMYK / alpha converted)
        except ImageError as e:
            return None, [_skip(record, _image_error_reason(e))]
        if pixels.shape[:2] != (height, width):
            reason = (f"size_mismatch: file is {pixels.shape[1]}x{pixels.shape[0]} (w x h), "
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
        rpn = compute_rpn_targets(
            anchors=self.anchors, gt_boxes=gt_boxes, crowd_boxes=crowd_boxes,
            positive_iou=cfg.rpn.positive_iou, negative_iou=cfg.rpn.negative_iou, crowd_iou=cfg.rpn.crowd_iou,
            bbox_std=tuple(cfg.rpn.bbox_std),
        )
        row = {
            "image_id": int(record["image_id"]),
            "file_name": record["file_name"],
            "height": height,
            "width": width,
            "scale": float(np.float32(geo.scale)),
            "window": [int(v) for v in geo.window],
            "image": encode_image(pixels, geo.new_w, geo.new_h, encoding=cfg.image.encoding,
                                  quality=cfg.image.jpeg_quality),
            "gt_class_ids": np.asarray([a["category_id"] for a in kept], np.int32),
            "gt_boxes": gt_boxes.numpy().astype(np.float32).reshape(-1),  # [G, 4] -> flat
            "mini_masks": packed,
            "crowd_boxes": crowd_boxes.numpy().astype(np.float32).reshape(-1),
            "rpn_pos_idx": rpn.pos_idx.numpy().astype(np.int32),
            "rpn_pos_deltas": rpn.pos_deltas.numpy().astype(np.float32).reshape(-1),
            "rpn_ignore_idx": rpn.ignore_idx.numpy().astype(np.int32),
            "num_instances": g,
            "num_crowd": len(crowds),
            "_dropped": dropped,
        }
        return row, reports


def encode_image(pixels: np.ndarray, new_w: int, new_h: int, *, encoding: str = "jpeg", quality: int = 95) -> bytes:
    """[H, W, 3] uint8 RGB -> bytes of the image resized to new_w x new_h (bilinear, antialiased), unpadded."""
    from PIL import Image

    img = Image.fromarray(pixels, "RGB")
    if img.size != (new_w, new_h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    if encoding == "jpeg":
        img.save(buf, "JPEG", quality=quality)
    elif encoding == "png":
        img.save(buf, "PNG")
    else:
        raise ValueError(f"image.encoding must be 'jpeg' or 'png', got {encoding!r}")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- writing


def _new_stats() -> dict[str, Any]:
    return {"files": [], "num_images": 0, "num_instances": 0, "num_crowd": 0, "num_empty": 0,
            "instances_over_limit": 0, "reports": []}


class _SplitWriter:
    """Streams one split's rows of one write task into files of <= rows_per_shard rows, row groups of
    rows_per_row_group rows (the last one of a task may be shorter)."""

    def __init__(self, filesystem: pafs.FileSystem, folder: str, prefix: str, rows_per_shard: int,
                 rows_per_row_group: int):
        self.filesystem, self.folder, self.prefix = filesystem, folder, prefix
        self.rows_per_shard, self.rows_per_row_group = rows_per_shard, rows_per_row_group
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.writer: Any = None
        self.rows_in_file = 0
        self.files: list[str] = []  # base names

    def append(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_row_group:
            self._write_group(self.rows_per_row_group)

    def close(self) -> None:
        while self.pending_rows:
            self._write_group(self.pending_rows)
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _write_group(self, rows: int) -> None:
        import pyarrow.parquet as pq

        rows = min(rows, self.rows_per_shard - self.rows_in_file)
        if self.writer is None:
            name = f"{self.prefix}-{len(self.files):03d}.parquet"
            self.files.append(name)
            self.filesystem.create_dir(self.folder, recursive=True)
            self.writer = pq.ParquetWriter(f"{self.folder}/{name}", SHARD_SCHEMA, filesystem=self.filesystem)
        table = pa.concat_tables(self.pending)
        self.writer.write_table(table.slice(0, rows), row_group_size=rows)  # exactly one row group
        rest = table.slice(rows)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows
        self.rows_in_file += rows
        if self.rows_in_file >= self.rows_per_shard:
            self.writer.close()
            self.writer, self.rows_in_file = None, 0


class ShardDatasink(Datasink):
    """Writes each split's good rows to `<out_root>/<split>/part-<task>-<k>.parquet` (SHARD_SCHEMA).

    Each write task streams its blocks through a `_SplitWriter` per split and returns only counts and skip
    reports; `on_write_complete` (on the driver) merges them into `.result` = {split: {"files" (relative to
    out_root), "num_images", "num_instances", "num_crowd", "num_empty", "instances_over_limit", "reports"}}.
    File names carry the write task's index, so a retried task overwrites its own files.
    """

    def __init__(self, out_root: str, *, rows_per_shard: int, rows_per_row_group: int):
        self.out_root = out_root
        self.rows_per_shard = rows_per_shard
        self.rows_per_row_group = rows_per_row_group
        self.result: dict[str, dict[str, Any]] = {}

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, dict[str, Any]]:
        import pyarrow.compute as pc

        filesystem, root = filesystem_for(self.out_root)
        stats: dict[str, dict[str, Any]] = {}
        writers: dict[str, _SplitWriter] = {}
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
            for split in pc.unique(table["_split"]).to_pylist():
                part = table.filter(pc.equal(table["_split"], split))
                s = stats.setdefault(split, _new_stats())
                for text in part["_reports"].to_pylist():
                    s["reports"].extend(json.loads(text))
                s["instances_over_limit"] += int(pc.sum(part["_dropped"]).as_py() or 0)
                good = part.filter(part["_ok"]).select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
                if not good.num_rows:
                    continue
                s["num_images"] += good.num_rows
                s["num_instances"] += int(pc.sum(good["num_instances"]).as_py())
                s["num_crowd"] += int(pc.sum(good["num_crowd"]).as_py())
                s["num_empty"] += int(pc.sum(pc.equal(good["num_instances"], 0).cast(pa.int64())).as_py())
                if split not in writers:
                    writers[split] = _SplitWriter(filesystem, f"{root}/{split}", f"part-{ctx.task_idx:05d}",
                                                  self.rows_per_shard, self.rows_per_row_group)
                writers[split].append(good)
        for split, writer in writers.items():
            writer.close()
            stats[split]["files"] = [f"{split}/{name}" for name in writer.files]
        return stats

    def on_write_complete(self, write_result: Any) -> None:
        for stats in write_result.write_returns:
            for split, s in (stats or {}).items():
                total = self.result.setdefault(split, _new_stats())
                for key, value in s.items():
                    total[key] = total[key] + value


# ---------------------------------------------------------------------------------------------- storage


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


# ---------------------------------------------------------------------------------------------- the stage


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
    address: str | None = None,
    max_workers: int | None = None,
) -> str:
    """Preprocess `splits` [(name, annotations JSON, images folder)] into `out` (local path or URI).

    Training splits (`train_splits`, default: names starting with "train") drop images without instances
    when `config.preprocess.drop_empty_train`; evaluation splits keep them; both count them. Raises
    OutputExistsError if `out` holds a manifest and not `overwrite`, DatasetError (before any work) for a
    missing or malformed annotations file. Uses the running Ray, else connects to `address` / RAY_ADDRESS or
    starts a local one. `max_workers` caps the actor pool (default: every CPU of the cluster).
    Returns the manifest's path / URI.
    """
    from pipelines.coco_source import DatasetError, read_split

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
    plan = [_Split(n, absolute(a), absolute(i), is_train(n)) for n, a, i in splits]

    out = absolute(out)
    filesystem, root = filesystem_for(out)
    manifest_path = f"{root}/{MANIFEST}"
    if exists(filesystem, manifest_path) and not overwrite:
        raise OutputExistsError(f"{out} already holds a complete preprocess output ({MANIFEST}); "
                                "pass overwrite=True (--overwrite) to replace it")

    # Every annotations file is read and checked before any image work: a bad file fails here, fast.
    sources = {s.name: read_split(s.annotations, s.images_root) for s in plan}
    categories = sources[plan[0].name].categories
    for s in plan[1:]:
        if sources[s.name].categories != categories:
            raise DatasetError(f"split {s.name!r} has other categories than {plan[0].name!r}: "
                               "contiguous class ids would not agree")

    items, dropped_empty = [], {}
    for s in plan:
        source = sources[s.name]
        source.coco = None  # the pycocotools index is not needed here; free it
        dropped = []
        for record in sorted(source.records, key=lambda r: r["image_id"]):
            if s.training and config.preprocess.drop_empty_train and not any(
                    not a["iscrowd"] for a in record["annotations"]):
                dropped.append(record["image_id"])
                continue
            items.append({"split": s.name, "record": json.dumps(record)})
        dropped_empty[s.name] = dropped
        source.records = []

    _ensure_ray(address)
    import ray

    started = time.time()
    if "://" not in out and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        print(f"[preprocess] warning: {out} is a local path on a multi-node cluster; every node writes its own "
              "disk unless it is a shared filesystem (use s3:// or gs://)", file=sys.stderr, flush=True)
    if overwrite and exists(filesystem, manifest_path):
        with filesystem.open_input_stream(manifest_path) as f:
            old = json.loads(f.read() or b"{}")  # any schema version: it is being replaced
        filesystem.delete_file(manifest_path)  # from here on the old output no longer looks complete
        for name in old.get("splits", {}):
            if isinstance(name, str) and _SPLIT_NAME.match(name):  # only folders the old run made
                _delete(filesystem, f"{root}/{name}")
    for info in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.base_name.startswith(".tmp-"):  # left by an interrupted run
            _delete(filesystem, info.path)
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
    tmp_manifest = f"{root}/{tmp_name}/{MANIFEST}"
    with filesystem.open_output_stream(tmp_manifest) as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=False).encode())
    filesystem.move(tmp_manifest, manifest_path)
    _delete(filesystem, f"{root}/{tmp_name}")
    if progress:
        for s in plan:
            m = manifest["splits"][s.name]
            print(f"[preprocess] {s.name}: {m['num_images']} images, {m['num_instances']} instances, "
                  f"{len(m['skipped'])} skip reports, {len(m['files'])} file(s)", file=sys.stderr, flush=True)
    return join_uri(out, MANIFEST)


def _ensure_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        from pipelines.ray_env import init_ray

        init_ray(address)


def _run(ray: Any, config: Config, items: list[dict[str, str]], tmp_root: str, *, progress: bool,
         max_workers: int | None) -> dict[str, dict[str, Any]]:
    """Run the Ray Data job over every split's records; returns the datasink's merged per-split result."""
    from ray.data import ActorPoolStrategy, DataContext

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
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


def _manifest(config: Config, plan: list[_Split], sources: dict[str, Any], written: dict[str, dict[str, Any]],
              dropped_empty: dict[str, list[int]], categories: Any, seconds: float) -> dict[str, Any]:
    splits = {}
    for s in plan:
        source, w = sources[s.name], written.get(s.name, {})
        skipped = sorted([*source.skipped, *w.get("reports", [])], key=_skip_sort_key)
        image_skips = [e for e in skipped if e.get("annotation_id") is None and e.get("action") == "skipped"]
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
            "instances_over_limit": int(w.get("instances_over_limit", 0)),
            "num_skipped_images": len(image_skips),
            "skip_counts": dict(sorted(Counter(e["reason"].split(":")[0] for e in skipped).items())),
            "skipped": skipped,
        }
    data_hash = hashlib.sha256(json.dumps(
        [config.fingerprint()] + [splits[s.name]["annotations_sha256"] for s in plan]).encode()).hexdigest()[:16]
    from mrcnn.anchors import anchors_from_config

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

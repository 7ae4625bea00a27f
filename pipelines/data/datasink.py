"""The Parquet sink of `preprocess`: shard rows streamed into `<split>/part-*.parquet` files in Ray Data's write
tasks, each task handing back only counts and skip reports (the driver never holds image rows)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from ray.data import Datasink

from pipelines.data.shards import SHARD_SCHEMA
from pipelines.infra.storage import filesystem_for


def new_stats() -> dict[str, Any]:
    return {"files": [], "num_images": 0, "num_instances": 0, "num_crowd": 0, "num_empty": 0,
            "instances_over_limit": 0, "images_over_limit": 0, "crowd_over_limit": 0, "images_crowd_over_limit": 0,
            "reports": []}


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
        filesystem, root = filesystem_for(self.out_root)
        stats: dict[str, dict[str, Any]] = {}
        writers: dict[str, _SplitWriter] = {}
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
            for split in pc.unique(table["_split"]).to_pylist():
                part = table.filter(pc.equal(table["_split"], split))
                s = stats.setdefault(split, new_stats())
                for text in part["_reports"].to_pylist():
                    s["reports"].extend(json.loads(text))
                s["instances_over_limit"] += int(pc.sum(part["_dropped"]).as_py() or 0)
                s["images_over_limit"] += int(pc.sum(pc.greater(part["_dropped"], 0).cast(pa.int64())).as_py() or 0)
                s["crowd_over_limit"] += int(pc.sum(part["_crowd_dropped"]).as_py() or 0)
                s["images_crowd_over_limit"] += int(
                    pc.sum(pc.greater(part["_crowd_dropped"], 0).cast(pa.int64())).as_py() or 0)
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
                total = self.result.setdefault(split, new_stats())
                for key, value in s.items():
                    total[key] = total[key] + value

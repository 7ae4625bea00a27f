"""A preprocessed shard set, opened once from where it lives (docs/design.md, "The manifest").

    SHARDS/manifest.json                 written last by `pipelines.data.preprocess`: its presence marks a complete run
    SHARDS/<split>/part-*.parquet        one row per image (`pipelines.data.shards.SHARD_SCHEMA`)

`ShardSet.open(uri)` resolves the location (a local path or a URI: `s3://`, `gs://`, `file://`) to its pyarrow
filesystem and root once and reads the manifest; train, evaluate, inspect and the loader take the ShardSet, not the
string. A split's files are the ones the manifest lists (`files`); `dataset(split)` is those files as a Ray Data
dataset, `read_rows` a few rows of them without Ray. Bad files raise `ShardsError`s naming the file and what to do:
no manifest (`MissingManifestError`), a manifest that is not JSON or of another schema version (`ManifestError`),
a shard file that is not readable Parquet (`ShardFileError`); shards made with another shard config are refused by
`check_fingerprint` (`FingerprintMismatch`, naming the fields that differ).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from mrcnn.config import LEGACY_SHARD_FIELDS, Config, fingerprint_diff
from pipelines.data.errors import InputError, ManifestError, MissingManifestError, ShardFileError, ShardsError
from pipelines.data.shards import MANIFEST, SCHEMA_VERSION
from pipelines.infra.storage import absolute, exists, filesystem_for, join_uri, read_file

_RERUN = "rerun `mrcnn-cli preprocess` (with --overwrite) to make them again"


class FingerprintMismatch(InputError):
    """Shards made with a different shard config; `fields` lists 'key: shards != config' strings."""

    def __init__(self, fields: list[str]):
        self.fields = fields
        super().__init__("shards were preprocessed with a different config; differing fields: " + "; ".join(fields))


@dataclass(frozen=True)
class ShardSet:
    """A complete preprocess output. uri: as given, a local path made absolute (Ray workers do not share the
    driver's working directory); filesystem and root: where it lives; manifest: its manifest.json."""

    uri: str
    filesystem: pafs.FileSystem
    root: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, uri: str) -> ShardSet:
        """Resolve `uri` and read its manifest. MissingManifestError when there is none (not preprocessed, or the
        run did not finish), ManifestError when it is not JSON or of another schema version."""
        uri = absolute(uri)
        filesystem, root = filesystem_for(uri)
        root = root.rstrip("/") or "/"
        path, where = f"{root}/{MANIFEST}", join_uri(uri, MANIFEST)
        if not exists(filesystem, path):
            raise MissingManifestError(f"no {MANIFEST} in {uri}: not preprocessed, or the run did not finish "
                                       "(rerun `mrcnn-cli preprocess`)")
        try:
            manifest = json.loads(read_file(filesystem, path))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{where}: not valid JSON ({exc}); {_RERUN}") from exc
        if not isinstance(manifest, dict):
            raise ManifestError(f"{where}: not a manifest (a JSON {type(manifest).__name__}); {_RERUN}")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            why = (" (v1 shards hold resized, re-encoded images; v2 keeps the source images and resizes when loading)"
                   if version == 1 else "")
            raise ManifestError(f"{uri}: shard schema version {version!r}, this code reads {SCHEMA_VERSION}{why}; "
                                f"{_RERUN}")
        return cls(uri, filesystem, root, manifest)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def categories(self) -> dict[str, Any]:
        """The category map, `CategoryMap.to_dict()` form."""
        return self.manifest["categories"]

    @property
    def splits(self) -> dict[str, dict[str, Any]]:
        return self.manifest["splits"]

    def split(self, name: str) -> dict[str, Any]:
        """The manifest's entry of split `name` (num_images, files, annotations, ...); ShardsError if absent."""
        if name not in self.splits:
            raise ShardsError(f"split {name!r} is not in {self.uri} (has {', '.join(self.splits)})")
        return self.splits[name]

    def check_fingerprint(self, config: Config) -> None:
        """`check_fingerprint(self.manifest, config)`."""
        check_fingerprint(self.manifest, config)

    def files(self, split: str) -> list[str]:
        """The split's Parquet files as the manifest lists them, as paths inside `filesystem`."""
        return [f"{self.root}/{name}" for name in self.split(split)["files"]]

    def uris(self, split: str) -> list[str]:
        """The split's Parquet files as full paths / URIs (a URI's query, its s3 options, at the end)."""
        return [join_uri(self.uri, name) for name in self.split(split)["files"]]

    def dataset(self, split: str, *, override_num_blocks: int | None = None):
        """The split's files as a Ray Data dataset (lazy, streamed). ShardFileError naming the file when one is not
        readable Parquet (Ray reads every file's footer here, on the driver)."""
        import ray.data

        # the filesystem handed over: Ray Data would keep a URI's query (s3 options such as endpoint_override) in
        # the object key
        try:
            return ray.data.read_parquet(self.files(split), filesystem=self.filesystem,
                                         override_num_blocks=override_num_blocks)
        except (pa.ArrowException, OSError):
            self.check_files(split)  # names the file that is at fault
            raise

    def check_files(self, split: str) -> None:
        """Read each file's Parquet footer: ShardFileError naming the first file that is missing or not Parquet."""
        for path, uri in zip(self.files(split), self.uris(split), strict=True):
            try:
                pq.read_metadata(path, filesystem=self.filesystem)
            except (pa.ArrowException, OSError) as exc:
                raise ShardFileError(_bad_file(uri, exc)) from exc

    def image_ids(self, split: str) -> list[int]:
        """The image ids of a split's rows, in file order (the `image_id` column alone, with pyarrow, no Ray)."""
        ids: list[int] = []
        for path, uri in zip(self.files(split), self.uris(split), strict=True):
            ids += self._parquet_file(path, uri).read(columns=["image_id"]).column(0).to_pylist()
        return ids

    def read_rows(self, split: str, *, start: int = 0, count: int = 1,
                  image_id: int | None = None) -> list[dict[str, Any]]:
        """`count` consecutive rows of a split from position `start`, or the row of `image_id`, as
        `to_pylist()` dicts. Read with pyarrow row group by row group, no Ray: a picture needs a few rows."""
        files = [self._parquet_file(path, uri) for path, uri in zip(self.files(split), self.uris(split), strict=True)]
        if image_id is not None:
            offset = 0
            for pf in files:
                ids = pf.read(columns=["image_id"]).column(0).to_pylist()
                if image_id in ids:
                    start, count = offset + ids.index(image_id), 1
                    break
                offset += len(ids)
            else:
                raise ShardsError(f"image {image_id} is not in split {split!r} of {self.uri}")
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
            raise ShardsError(f"split {split!r} of {self.uri} has {offset} rows: no row {start}")
        return rows

    def _parquet_file(self, path: str, uri: str) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.filesystem.open_input_file(path))
        except (pa.ArrowException, OSError) as exc:
            raise ShardFileError(_bad_file(uri, exc)) from exc


def read_manifest(shards_uri: str) -> dict[str, Any]:
    """The manifest of a complete preprocess output (`ShardSet.open(shards_uri).manifest`)."""
    return ShardSet.open(shards_uri).manifest


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


def _bad_file(uri: str, exc: Exception) -> str:
    what = "missing" if isinstance(exc, FileNotFoundError) else "not a readable Parquet file (truncated or corrupted?)"
    return f"{uri}: shard file {what}: {exc}; {_RERUN}"

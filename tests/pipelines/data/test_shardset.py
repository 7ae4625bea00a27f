"""`ShardSet`: a shard set opened once, and the short errors that bad files give, each naming the file."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mrcnn.config import shapes
from pipelines.data.errors import InputError, ManifestError, MissingManifestError, ShardFileError, ShardsError
from pipelines.data.shards import SCHEMA_VERSION, SHARD_SCHEMA
from pipelines.data.shardset import ShardSet


def _row(image_id: int) -> dict:
    return {"image_id": image_id, "file_name": f"{image_id}.png", "height": 2, "width": 3, "scale": 1.0,
            "window": [0, 0, 3, 2], "image": b"not decoded here", "gt_class_ids": [], "gt_boxes": [],
            "mini_masks": b"", "crowd_boxes": [], "rpn_pos_idx": [], "rpn_pos_deltas": [], "rpn_ignore_idx": [],
            "num_instances": 0, "num_crowd": 0}


def _shard_set(root, ids_per_file=((1, 2), (3, 4, 5))) -> list:
    """A shard set of split val2017 with one file per `ids_per_file` entry (row groups of 2 rows), written
    without Ray. Returns the files' paths."""
    config = shapes()
    files = []
    for i, ids in enumerate(ids_per_file):
        name = f"val2017/part-{i:05d}-000.parquet"
        (root / "val2017").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([_row(j) for j in ids], schema=SHARD_SCHEMA), root / name,
                       row_group_size=2)
        files.append(name)
    # a file in the folder that the manifest does not list is not part of the split
    pq.write_table(pa.Table.from_pylist([_row(99)], schema=SHARD_SCHEMA), root / "val2017" / "stray.parquet")
    manifest = {"schema_version": SCHEMA_VERSION, "fingerprint": config.fingerprint(),
                "shard_fields": config.shard_fields(), "config": config.to_dict(),
                "categories": {"coco_ids": [1], "names": ["a"]},
                "splits": {"val2017": {"files": files, "num_images": sum(map(len, ids_per_file))}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return [root / f for f in files]


def test_a_shard_set_reads_the_files_its_manifest_lists(tmp_path):
    _shard_set(tmp_path)
    shards = ShardSet.open(str(tmp_path))
    assert shards.uri == str(tmp_path) and shards.fingerprint == shapes().fingerprint()
    assert shards.uris("val2017") == [f"{tmp_path}/val2017/part-00000-000.parquet",
                                      f"{tmp_path}/val2017/part-00001-000.parquet"]
    assert [r["image_id"] for r in shards.read_rows("val2017", start=1, count=3)] == [2, 3, 4]
    assert [r["image_id"] for r in shards.read_rows("val2017", image_id=5)] == [5]
    shards.check_files("val2017")
    shards.check_fingerprint(shapes())
    with pytest.raises(ShardsError, match=r"split 'train2017' is not in .* \(has val2017\)"):
        shards.files("train2017")
    with pytest.raises(ShardsError, match="image 99 is not in split 'val2017'"):
        shards.read_rows("val2017", image_id=99)


def test_a_folder_without_a_manifest_is_an_input_error_naming_it(tmp_path):
    with pytest.raises(MissingManifestError) as e:
        ShardSet.open(str(tmp_path))
    assert isinstance(e.value, InputError) and isinstance(e.value, FileNotFoundError)
    assert str(tmp_path) in str(e.value) and "rerun `mrcnn-cli preprocess`" in str(e.value)


@pytest.mark.parametrize("text", ['{"schema_version": 2, "splits": {', "[1, 2]", "\xff\xfe"])
def test_a_corrupt_manifest_names_the_file(tmp_path, text):
    (tmp_path / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ManifestError) as e:
        ShardSet.open(str(tmp_path))
    assert isinstance(e.value, InputError)
    assert f"{tmp_path}/manifest.json" in str(e.value) and "--overwrite" in str(e.value)


def test_a_truncated_shard_file_names_the_file(tmp_path):
    files = _shard_set(tmp_path)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])
    shards = ShardSet.open(str(tmp_path))
    for read in (lambda: shards.read_rows("val2017", count=5), lambda: shards.check_files("val2017")):
        with pytest.raises(ShardFileError) as e:
            read()
        assert isinstance(e.value, InputError)
        assert f"{files[1]}: shard file not a readable Parquet file" in str(e.value), str(e.value)
    files[1].unlink()
    with pytest.raises(ShardFileError, match=f"{files[1]}: shard file missing"):
        shards.check_files("val2017")


def test_the_ray_dataset_of_a_truncated_shard_file_names_the_file(tmp_path, ray_session):
    """Ray Data reads every file's footer when the dataset is made, on the driver: the error says which file."""
    files = _shard_set(tmp_path)
    shards = ShardSet.open(str(tmp_path))
    assert sorted(r["image_id"] for r in shards.dataset("val2017").take_all()) == [1, 2, 3, 4, 5]  # not stray's 99
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) - 20])
    with pytest.raises(ShardFileError, match=f"{files[0]}: shard file not a readable Parquet file"):
        shards.dataset("val2017")

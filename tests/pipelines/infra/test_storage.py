"""`pipelines.infra.storage` on local paths: what is a URI, and the one temp-then-rename write."""

from __future__ import annotations

import os

from pyarrow import fs as pafs

from pipelines.infra.storage import absolute, is_uri, read_bytes, replace_file, write_atomic


def test_is_uri_tells_a_uri_from_a_local_path(tmp_path):
    assert all(is_uri(u) for u in ("s3://b/k", "gs://b/k", "file:///tmp/x", "hdfs://h:8020/x"))
    assert not any(is_uri(p) for p in ("shards", "/data/shards", "./a://b", "C:/data", "torchvision:w.pth",
                                       tmp_path))
    assert absolute("s3://b/k?endpoint_override=h:9") == "s3://b/k?endpoint_override=h:9"
    assert absolute("x") == os.path.abspath("x")


def test_write_atomic_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "manifest.json"
    assert write_atomic(path, b"first") == str(path)
    write_atomic(f"file://{path}", b"second")  # a URI the same way
    assert read_bytes(path) == b"second"
    replace_file(pafs.LocalFileSystem(), str(path), b"third")
    assert read_bytes(path) == b"third"
    assert os.listdir(path.parent) == ["manifest.json"]

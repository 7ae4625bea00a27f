"""Storage: local paths and URIs (`s3://`, `gs://`, `file://`) through one set of functions.

Every stage reads and writes through these, so a path may be a local folder on one machine or a bucket shared
by a whole Ray cluster: `filesystem_for(uri)` gives the pyarrow filesystem and the path inside it, `absolute`
makes local paths absolute (Ray workers do not share the driver's working directory), and `read_bytes` /
`write_bytes` move whole files (`read_file` for a file of a filesystem already at hand). `write_atomic` /
`replace_file` write under a temporary name and then rename: the one way a file that readers take as complete
(a manifest, a checkpoint's state, a stage's marker) is written. `is_uri` tells a URI from a local path.
Imports nothing from the rest of the project.
"""

from __future__ import annotations

import os
import re

from pyarrow import fs as pafs

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path: str | os.PathLike) -> bool:
    """`scheme://...` (s3://, gs://, file://, ...); anything else is a local path."""
    return bool(_URI.match(os.fspath(path)))


def read_bytes(path: str | os.PathLike) -> bytes:
    """Whole file from a local path or a URI (through pyarrow.fs). FileNotFoundError when absent."""
    path = os.fspath(path)
    if not is_uri(path):
        with open(path, "rb") as f:
            return f.read()

    filesystem, inner = pafs.FileSystem.from_uri(path)
    info = filesystem.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    return read_file(filesystem, inner)


def read_file(filesystem: pafs.FileSystem, path: str) -> bytes:
    """A whole file of `filesystem`, in one read: on an object store one GET. (`open_input_stream(path).read()`
    does not know the size and reads 256 KiB at a time, one ranged GET each: 400 requests for a 100 MB
    checkpoint.)"""
    with filesystem.open_input_file(path) as f:
        return f.read()


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path (made absolute) or a URI."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def absolute(path: str | os.PathLike) -> str:
    """A URI as it is, a local path made absolute (Ray workers do not share the driver's working directory)."""
    path = os.fspath(path)
    return path if is_uri(path) else os.path.abspath(path)


def join_uri(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended to its path. A URI's query (s3 options such as
    `?endpoint_override=host:port&scheme=http`) stays at the end, where pyarrow reads it; local paths have none."""
    base, query = uri, ""
    if is_uri(uri):
        base, sep, rest = uri.partition("?")
        query = sep + rest
    return "/".join([base.rstrip("/"), *parts]) + query


def exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write a whole file to a local path (parent folders made) or a URI (`s3://`, `gs://`, through
    pyarrow.fs). Returns the path as a string."""
    path = os.fspath(path)
    if is_uri(path):
        filesystem, inner = pafs.FileSystem.from_uri(path)
        parent = inner.rsplit("/", 1)[0]
        if parent and parent != inner:
            filesystem.create_dir(parent, recursive=True)
        with filesystem.open_output_stream(inner) as f:
            f.write(data)
        return path
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def replace_file(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `path` of `filesystem` whole under a temporary name, then move it into place: a reader sees the old
    file or the new one, never half of one. (A rename on a local or POSIX filesystem; on an object store a move
    is copy + delete, and the object only appears once whole either way.) The parent folder must exist."""
    tmp = f"{path}.tmp"
    with filesystem.open_output_stream(tmp) as f:
        f.write(data)
    filesystem.move(tmp, path)


def write_atomic(path: str | os.PathLike, data: bytes) -> str:
    """`replace_file` for a local path (parent folders made) or a URI. Returns the path as a string."""
    path = os.fspath(path)
    filesystem, inner = filesystem_for(path)
    parent = inner.rsplit("/", 1)[0]
    if parent and parent != inner:
        filesystem.create_dir(parent, recursive=True)
    replace_file(filesystem, inner, data)
    return path

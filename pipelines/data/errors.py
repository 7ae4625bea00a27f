"""The errors bad input raises: each names the file (and the record) that is wrong, and what to do.
"""

from __future__ import annotations


class InputError(ValueError):
    """An error the user's input causes: the CLI prints its message without a traceback."""


class DatasetError(InputError):
    """A dataset that cannot be used; the message names the file."""


class UnsafePathError(DatasetError):
    """An image file name that would leave the images folder."""


class ImageError(DatasetError):
    """An image file that is missing, empty or cannot be decoded."""


class ShardsError(InputError):
    """Preprocessed shards that cannot be used: the message names the shard set or the file, and what to do."""


class ManifestError(ShardsError):
    """A manifest that is not valid JSON, or of another schema version."""


class MissingManifestError(ManifestError, FileNotFoundError):
    """A folder without a manifest: not preprocessed, or the run did not finish."""


class ShardFileError(ShardsError):
    """A shard file that is missing or not readable Parquet (truncated, corrupted)."""

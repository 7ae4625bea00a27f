"""The errors bad input raises: each names the file (and the record) that is wrong, and what to do.

`InputError` is the base of every error a user causes (a missing or malformed file, a model or shards that do not
fit, an output that already exists): the command line prints its message in a few lines, without a traceback
(`pipelines/cli_options.py`, `user_error`); any other exception is the project's own bug and keeps its traceback.
It is a ValueError, so code that caught the ValueError of an input check still catches it.
"""

from __future__ import annotations


class InputError(ValueError):
    """An error the user's input causes: the CLI prints its message without a traceback."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named (or that an input names) is not there."""


class DatasetError(InputError):
    """A dataset that cannot be used; the message names the file."""


class UnsafePathError(DatasetError):
    """An image file name that would leave the images folder."""


class ImageError(DatasetError):
    """An image file that is missing, empty or cannot be decoded."""


class ImageTooLargeError(ImageError):
    """An image of more pixels than a limit allows (`pipelines.data.coco.decode_image_bytes(max_pixels=...)`)."""


class ShardsError(InputError):
    """Preprocessed shards that cannot be used: the message names the shard set or the file, and what to do."""


class ManifestError(ShardsError):
    """A manifest that is not valid JSON, or of another schema version."""


class MissingManifestError(ManifestError, FileNotFoundError):
    """A folder without a manifest: not preprocessed, or the run did not finish."""


class ShardFileError(ShardsError):
    """A shard file that is missing or not readable Parquet (truncated, corrupted)."""

"""The errors a dataset raises: each names the file (and the record) that is wrong.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file."""


class UnsafePathError(DatasetError):
    """An image file name that would leave the images folder."""


class ImageError(DatasetError):
    """An image file that is missing, empty or cannot be decoded."""

"""The errors bad input raises: each names the file (and the record) that is wrong, and what to do.

`InputError` is the base of every error a user causes (a missing or malformed file, a model or shards that do not
fit, an output that already exists): the command line prints its message in a few lines, without a traceback
(`cli.py`, `user_error_message`); any other exception is the project's own bug and keeps its traceback. It is a
ValueError, so code that caught the ValueError of an input check still catches it.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input that cannot be used, caused by the user: the message names the file or option and what to do."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named (or that an input names) is not there."""


class DatasetError(InputError):
    """A dataset that cannot be used; the message names the file."""


class UnsafePathError(DatasetError):
    """An image file name that would leave the images folder."""


class ImageError(DatasetError):
    """An image file that is missing, empty or cannot be decoded."""

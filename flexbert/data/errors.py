"""One error type for bad data input, so callers can catch every data problem in one place."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or missing input to the data pipeline; the message names the file or field."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A path the data pipeline needs does not exist."""

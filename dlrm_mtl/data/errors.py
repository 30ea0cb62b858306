"""Errors raised on bad input data."""


class DataError(ValueError):
    """Bad input data; the message names the file, the column and the row where known."""

"""Errors that reach the user as one line (the CLI prints them without a traceback)."""


class CosmosPolicyError(ValueError):
    """Base class: bad input or configuration. The message is one line naming the file, key and
    what was expected."""


class DataError(CosmosPolicyError):
    """Malformed or inconsistent dataset input (source files, shards, statistics)."""

"""Errors a user can act on.

Every exception here carries a message that names the problem and what to do
about it. The CLI prints the message (no traceback unless ``--debug``) and exits
with status 2; any other exception is an internal error and exits with 1.
"""


class VaekitError(Exception):
    """Bad input or usage: the message says what is wrong and how to fix it."""


class DataError(VaekitError):
    """A data set could not be fetched, read or validated."""


class ConfigError(VaekitError):
    """A configuration is invalid (unknown key, impossible value)."""


class RunError(VaekitError):
    """A run directory is missing, incomplete, unsafe or from another version."""

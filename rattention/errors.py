"""The platform's user-facing errors. Each carries one line that names the field or file and what is
allowed; the command line prints that line alone, never a traceback."""

from __future__ import annotations


class RattentionError(Exception):
    """Base class: bad input the user can fix. ``str(err)`` is the one-line message."""


class ConfigError(RattentionError, ValueError):
    """A config field has a bad value: the message names the field and what is allowed."""


class DataError(RattentionError):
    """A dataset, shard or input path is missing, corrupt or unusable: the message names the file."""


class TrainingError(RattentionError):
    """Training cannot go on (NaN/inf loss, no checkpoint to resume): the message names the step."""

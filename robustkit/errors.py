"""The project's error types.

Every error caused by user input (a bad value, a bad config, a missing file, an unknown
name) is a ``RobustkitError``: the CLI prints it as one line ``robustkit: error: ...`` and
exits 2. Any other exception is a bug: the CLI exits 1 and says so. The subclasses also
derive from the matching builtin (``ValueError``, ``KeyError``, ``FileNotFoundError``) so that
library callers can catch what they would expect.
"""

from __future__ import annotations


class RobustkitError(Exception):
    """Base class for errors caused by user input (bad config, missing file, ...)."""


class InputError(RobustkitError, ValueError):
    """A value is not allowed; the message says what was wrong and what is allowed."""


class ConfigError(InputError):
    """A config file or override is invalid; the message names the key path."""


class CheckpointError(RobustkitError, ValueError):
    """A checkpoint is missing, corrupt, or does not match the model; names the file."""


class DatasetError(RobustkitError, FileNotFoundError):
    """A dataset could not be found; says where we looked and how to get it."""


class IncompatibleError(InputError):
    """A model and a dataset (or two models) do not fit together: input shape or class count."""

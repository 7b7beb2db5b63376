"""User-facing errors. The CLI turns these into one line on stderr and exit code 2."""

from __future__ import annotations


class RobustkitError(Exception):
    """Base class for errors caused by user input (bad config, missing file, ...)."""


class ConfigError(RobustkitError, ValueError):
    """A config file or override is invalid; the message names the key path."""


class CheckpointError(RobustkitError, ValueError):
    """A checkpoint is missing, corrupt, or does not match the model; names the file."""


class DatasetError(RobustkitError, FileNotFoundError):
    """A dataset could not be found; says where we looked and how to get it."""

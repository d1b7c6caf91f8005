"""Errors that reach the user as one readable line and a meaningful exit code."""

from __future__ import annotations


class StreamGuardError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits with ``exit_code``."""

    exit_code = 1


class InputError(StreamGuardError):
    """A video, stream or data set that cannot be read (missing, corrupt, no video stream...)."""

    exit_code = 3


class CheckpointError(StreamGuardError):
    """A missing, tampered, truncated or mismatched checkpoint."""

    exit_code = 4


class ConfigError(StreamGuardError):
    """A recipe or option with an unknown key, a wrong type or an impossible value."""

    exit_code = 2


class StreamError(StreamGuardError):
    """A live source that stalled or dropped and could not be recovered."""

    exit_code = 5

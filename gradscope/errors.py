"""Errors a person can act on: each carries the CLI exit status it maps to."""

from __future__ import annotations


class GradscopeError(Exception):
    """Base error. The message is one line saying what is wrong and what to do."""

    exit_code: int = 2


class UsageError(GradscopeError):
    """Bad arguments to a gradscope function or command."""


class AlreadyWatchedError(UsageError):
    """watch() on a model that another open scope already watches."""


class CheckpointError(GradscopeError):
    """A checkpoint that cannot be read safely (missing, corrupt, or needs code execution)."""


class GradscopeWarning(UserWarning):
    """Something went wrong inside gradscope during training; it warns once and training goes on."""

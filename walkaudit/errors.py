"""Typed errors. The CLI catches `WalkauditError` once and turns it into one line and an exit code."""

from __future__ import annotations


class WalkauditError(Exception):
    """Base of every error walkaudit reports to the user (never a traceback)."""

    exit_code = 2


class UsageError(WalkauditError):
    """A flag or option combination that cannot work."""


class ModelError(WalkauditError):
    """The model file cannot be loaded, validated or used as a classifier."""


class DataError(WalkauditError):
    """The data file is missing, unsafe or does not fit the model."""


class RuntimeFailure(WalkauditError):
    """onnxruntime (or walkaudit itself) failed while running a valid input."""

    exit_code = 3

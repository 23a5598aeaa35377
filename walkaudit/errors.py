"""Typed errors. The CLI catches `WalkauditError` once and turns it into one line and an exit code.

A message names an option through `option("x_key")`: the API shows the field (`x_key`), the CLI the flag
(`--x-key`, `WalkauditError.for_cli`), so one message serves both.
"""

from __future__ import annotations

import re

#: The CLI flag of each AuditConfig field whose flag is not simply `--field-name`.
FLAGS = {"mode": "--global", "selection": "--ops", "ops": "--ops", "names": "--site", "drops": "--drop"}

_MARK = "\x1f"
_OPTION = re.compile(f"{_MARK}([a-z_]+){_MARK}")


def option(name: str) -> str:
    """A reference to an option inside a message: the field in the API, the flag in the CLI."""
    return f"{_MARK}{name}{_MARK}"


def flag(name: str) -> str:
    """The CLI flag of an AuditConfig field."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


class WalkauditError(Exception):
    """Base of every error walkaudit reports to the user (never a traceback)."""

    exit_code = 2

    def __str__(self) -> str:
        return _OPTION.sub(lambda m: m.group(1), super().__str__())

    def for_cli(self) -> str:
        """The message with options named by their command-line flags."""
        return _OPTION.sub(lambda m: flag(m.group(1)), super().__str__())


class UsageError(WalkauditError):
    """A flag or option combination that cannot work."""


class ModelError(WalkauditError):
    """The model file cannot be loaded, validated or used as a classifier."""


class DataError(WalkauditError):
    """The data file is missing, unsafe or does not fit the model."""


class RuntimeFailure(WalkauditError):
    """onnxruntime (or walkaudit itself) failed while running a valid input."""

    exit_code = 3

"""Errors a user can cause, each with a message that says what, where and how to fix it.

Anything that is not a `UserError` is a bug: the CLI shows a short message and logs the traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; `str(error)` is the one line to show them."""


class DatasetError(UserError):
    """A dataset problem, located at `file`, optionally `line` and `field`."""

    def __init__(self, message: str, file: str = "", line: int | None = None, field: str = ""):
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = file + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: {message}" if where else message)


class ModelError(UserError):
    """A model that cannot be used: missing, malformed, unsafe or unsupported."""


class RunError(UserError):
    """A run that cannot be found, resumed or changed as asked."""


class ConfigError(UserError):
    """A training setting out of range or inconsistent with another."""


class PlanError(UserError):
    """No plan fits the memory budget; the message says what would."""


class ExportError(UserError):
    """A model that cannot be exported as asked: unsupported architecture, tokenizer, target or disk."""


class DiskFullError(RunError):
    """Not enough free disk for a checkpoint; the run ends with its last checkpoint intact."""

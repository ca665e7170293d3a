"""Exception tree. Every message says what went wrong *and* what to do about it.

The CLI maps ``FinitetuneError`` subclasses to exit codes (input problems -> 2), so a user
scripting finitetune can tell "your data is bad" apart from "training diverged".
"""

from __future__ import annotations


class FinitetuneError(Exception):
    """Base class of every error finitetune raises on purpose."""

    exit_code: int = 1


class ConfigError(FinitetuneError):
    """A setting that cannot work (bad value, unknown option, hardware cannot honour it)."""

    exit_code = 2


class DataError(FinitetuneError):
    """Input data or model files that cannot be read: names the file and line or index."""

    exit_code = 2


class LabelError(DataError):
    """Labels leave nothing to learn from (all masked, out of range, ...)."""


class ReportInputError(FinitetuneError):
    """A log or run directory the health report cannot parse."""

    exit_code = 2


class NonFiniteHalt(FinitetuneError):
    """Training stopped because the guard could not keep it finite.

    ``diagnosis`` carries the guard's explanation (reason, counts, last good step) so callers
    and the report can show it without parsing the message.
    """

    exit_code = 1

    def __init__(self, message: str, diagnosis: dict | None = None) -> None:
        super().__init__(message)
        self.diagnosis = dict(diagnosis or {})

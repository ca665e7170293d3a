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


class SettingError(ConfigError):
    """One setting with a wrong type or a value out of range.

    Says which setting (dotted: ``data.max_length``), the value, where it came from when the
    caller knows (``flag --max-steps``, ``train.yaml:3``, ``train(max_steps=...)``) and what
    it accepts, e.g. ``max_steps = -5 (flag --max-steps): expected an integer >= 1, or -1``.
    """

    def __init__(self, setting: str, value: object, expected: str, *, wrong_type: bool = False,
                 source: str | None = None) -> None:
        self.setting, self.value, self.expected = setting, value, expected
        self.wrong_type, self.source = wrong_type, source
        super().__init__(setting)

    def located(self, source: str | None) -> SettingError:
        """The same error, saying where the value came from."""
        self.source = source or self.source
        return self

    def prefixed(self, section: str) -> SettingError:
        """The same error for a setting inside ``section``."""
        self.setting = f"{section}.{self.setting}"
        return self

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        got = ""
        if self.wrong_type:
            got = f", got {_type_name(self.value)}"
            if isinstance(self.value, str) and _looks_numeric(self.value):
                got += " (write the number without quotes)"
        return f"{self.setting} = {self.value!r}{where}: expected {self.expected}{got}"


class UnknownSettingError(SettingError):
    """A setting name that does not exist (a typo in a YAML file or a keyword)."""

    def __init__(self, setting: str, owner: str, known: list[str], *,
                 suggestion: str | None = None, source: str | None = None) -> None:
        self.owner, self.known, self.suggestion = owner, known, suggestion
        super().__init__(setting, None, "a known setting", source=source)

    def prefixed(self, section: str) -> SettingError:
        if self.suggestion:
            self.suggestion = f"{section}.{self.suggestion}"
        return super().prefixed(section)

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        hint = f" (did you mean {self.suggestion!r}?)" if self.suggestion else ""
        return (f"unknown setting {self.setting!r}{where} for {self.owner}{hint}; "
                f"known: {', '.join(self.known)}")


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "a list", dict: "a mapping", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class OutputError(ConfigError):
    """An output path finitetune may not write: a special file, a symlink, a folder it did not
    create, a place without write permission. Nothing is written or deleted."""


class ResumeError(ConfigError, ValueError):
    """A checkpoint to resume from cannot be used. Also a ``ValueError``, the type
    transformers raises for the same mistake, and its message starts with transformers' own
    text: code written against a plain Trainer (``except ValueError``, a message match) keeps
    working; finitetune's reason follows."""


class DataError(FinitetuneError):
    """Input data or model files that cannot be read: names the file and line or index."""

    exit_code = 2


class LabelError(DataError):
    """Labels leave nothing to learn from (all masked, out of range, ...)."""


class ReportInputError(FinitetuneError):
    """A log or run directory the health report cannot parse."""

    exit_code = 2


class NestingError(ReportInputError, ValueError):
    """JSON or YAML nested deeper than :data:`finitetune.parsing.MAX_NESTING` levels: refused,
    naming the file and line, before a recursive parser can fail on it. A ``ValueError`` as
    well, so a tolerant reader that skips unreadable lines skips such a line the same way."""


class NonFiniteHalt(FinitetuneError):
    """Training stopped because the guard could not keep it finite.

    ``diagnosis`` carries the guard's explanation (reason, counts, last good step) so callers
    and the report can show it without parsing the message.
    """

    exit_code = 1

    def __init__(self, message: str, diagnosis: dict | None = None) -> None:
        super().__init__(message)
        self.diagnosis = dict(diagnosis or {})

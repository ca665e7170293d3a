"""The type and range of every setting: one table, checked when a config is built.

Each field of :class:`~finitetune.settings.config.TrainConfig`, ``DataConfig`` and ``GuardConfig`` is
declared with one of the helpers below (``integer``, ``real``, ``choice``, ``text``, ``flag``,
``section``, ``names``), which store a :class:`Rule` in the field's metadata. ``__post_init__``
calls :func:`validate`, so the same check runs whatever built the config: command-line flags,
a YAML file, the Python API or a test. :func:`check_values` runs the same rules over one
*layer* of raw values (a YAML file, the flags) before the layers are merged, so an error can
say where the bad value came from.

No silent coercion: ``'16'`` is not an integer, ``True`` is not a number, ``16.0`` is not an
integer, NaN and infinities are not numbers a setting can take. The only conversions are
lossless ones: an integer given for a float setting becomes that float, an enum's value string
becomes the enum member.

Pure Python, no torch or transformers: ``finitetune report`` and ``explain`` import config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from finitetune.errors import SettingError, UnknownSettingError

RULE = "finitetune.rule"
"""The key of a field's :class:`Rule` in ``dataclasses.field(metadata=...)``."""


class BadValue(Exception):
    """Raised by :meth:`Rule.check`; :func:`validate` turns it into a :class:`SettingError`."""

    def __init__(self, wrong_type: bool) -> None:
        super().__init__()
        self.wrong_type = wrong_type


class Rule:
    """What one setting accepts. ``expected`` completes "expected ..." in an error message."""

    expected: str = "a valid value"

    def check(self, value: Any) -> Any:
        """The value to store (normalised: enum member, float), or raise :class:`BadValue`."""
        raise NotImplementedError


def _fmt(x: float | None) -> str:
    if x is not None and float(x).is_integer() and abs(x) < 1e16:
        return str(int(x))
    return f"{x:g}"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Number(Rule):
    """An int or a finite float in a range, plus optional special values outside it."""

    kind: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    special: tuple = ()
    """Values accepted besides the range, e.g. ``(-1,)`` or ``(None,)``."""
    meaning: str = ""
    """What the special values mean, shown in the error message."""

    @property
    def expected(self) -> str:  # type: ignore[override]
        what = "an integer" if self.kind is int else "a finite number"
        lo = (f">= {_fmt(self.ge)}" if self.ge is not None else
              f"> {_fmt(self.gt)}" if self.gt is not None else None)
        hi = (f"<= {_fmt(self.le)}" if self.le is not None else
              f"< {_fmt(self.lt)}" if self.lt is not None else None)
        if lo and hi:
            left = "[" if self.ge is not None else "("
            right = "]" if self.le is not None else ")"
            low = self.ge if self.ge is not None else self.gt
            high = self.le if self.le is not None else self.lt
            text = f"{what} in {left}{_fmt(low)}, {_fmt(high)}{right}"
        else:
            text = " ".join(x for x in (what, lo or hi) if x)
        if self.special:
            shown = ", ".join("null" if s is None else repr(s) for s in self.special)
            text += f", or {shown}" + (f" ({self.meaning})" if self.meaning else "")
        return text

    def check(self, value: Any) -> Any:
        if value in self.special and (value is None or _is_real(value)):
            return value
        if not (_is_int(value) if self.kind is int else _is_real(value)):
            raise BadValue(wrong_type=True)
        if self.kind is float:
            value = float(value)
            if not math.isfinite(value):
                raise BadValue(wrong_type=False)
        else:
            value = int(value)
        if ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                or (self.le is not None and value > self.le)
                or (self.lt is not None and value >= self.lt)):
            raise BadValue(wrong_type=False)
        return value


@dataclass(frozen=True)
class Choice(Rule):
    """One of a string enum's values (or the member itself)."""

    enum: type[Enum]

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "one of: " + ", ".join(str(m.value) for m in self.enum)

    def check(self, value: Any) -> Any:
        if isinstance(value, self.enum):
            return value
        if not isinstance(value, str):
            raise BadValue(wrong_type=True)
        try:
            return self.enum(value)
        except ValueError:
            raise BadValue(wrong_type=False) from None


@dataclass(frozen=True)
class Text(Rule):
    """A non-empty string (or ``None`` when ``optional``)."""

    optional: bool = False

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "a non-empty string" + (", or null" if self.optional else "")

    def check(self, value: Any) -> Any:
        if value is None and self.optional:
            return value
        if not isinstance(value, str):
            raise BadValue(wrong_type=True)
        if not value.strip():
            raise BadValue(wrong_type=False)
        return value


@dataclass(frozen=True)
class Flag(Rule):
    """``true`` or ``false``; not ``1``, not ``"yes"``."""

    expected: str = "true or false"

    def check(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise BadValue(wrong_type=True)
        return value


@dataclass(frozen=True)
class Names(Rule):
    """A keyword (e.g. ``all-linear``), a comma-separated string or a list of names."""

    expected: str = "a non-empty string (comma-separated names) or a list of names"

    def check(self, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip(" ,"):
                raise BadValue(wrong_type=False)
            return value
        if not isinstance(value, (list, tuple)):
            raise BadValue(wrong_type=True)
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise BadValue(wrong_type=False)
        return list(value)


@dataclass(frozen=True)
class Section(Rule):
    """A nested config (``data``, ``guard``): an instance, or a mapping of its settings."""

    cls: type

    @property
    def expected(self) -> str:  # type: ignore[override]
        names = [f.name for f in dataclasses.fields(self.cls)][:4]
        return f"a mapping of {self.cls.__name__} settings ({', '.join(names)}, ...)"

    def check(self, value: Any) -> Any:
        if isinstance(value, self.cls):
            return value
        if not isinstance(value, Mapping):
            raise BadValue(wrong_type=True)
        return build(self.cls, value)


# ------------------------------------------------------------------ field declarations --
def _field(default: Any, rule: Rule) -> Any:
    return field(default=default, metadata={RULE: rule})


def integer(default: int | None, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, special: tuple = (),
            meaning: str = "") -> Any:
    """An integer setting; ``special`` values (e.g. ``-1``, ``None``) are accepted as well."""
    return _field(default, Number(int, ge, gt, le, lt, special, meaning))


def real(default: float | None, *, ge: float | None = None, gt: float | None = None,
         le: float | None = None, lt: float | None = None, special: tuple = (),
         meaning: str = "") -> Any:
    """A finite float setting (an int is accepted and stored as float)."""
    return _field(default, Number(float, ge, gt, le, lt, special, meaning))


def choice(default: Enum) -> Any:
    """A closed set of strings: the enum of ``default``."""
    return _field(default, Choice(type(default)))


def text(default: str | None, *, optional: bool = False) -> Any:
    """A non-empty string (``optional``: or ``None``)."""
    return _field(default, Text(optional))


def flag(default: bool) -> Any:
    """A boolean setting."""
    return _field(default, Flag())


def names(default: Any) -> Any:
    """A name list (``lora_targets``)."""
    return _field(default, Names())


def section(cls: type) -> Any:
    """A nested config section."""
    return field(default_factory=cls, metadata={RULE: Section(cls)})


# ----------------------------------------------------------------------------- checking --
def _checked(name: str, rule: Rule, value: Any) -> Any:
    try:
        return rule.check(value)
    except BadValue as bad:
        raise SettingError(name, value, rule.expected, wrong_type=bad.wrong_type) from None
    except SettingError as exc:  # from a nested section: name it from the top
        raise exc.prefixed(name) from None


def validate(obj: Any) -> None:
    """Check and normalise every field of the dataclass ``obj`` that declares a rule."""
    for f in dataclasses.fields(obj):
        rule = f.metadata.get(RULE)
        if rule is not None:
            setattr(obj, f.name, _checked(f.name, rule, getattr(obj, f.name)))


def check_values(cls: type, values: Mapping[str, Any], prefix: str = "") -> None:
    """Check one layer of raw values (a YAML file, the flags) against ``cls``'s rules.

    Unknown keys and bad values raise with their dotted name (``data.max_length``); nested
    mappings are checked key by key, so a partial section is fine. Cross-field rules are
    left to the merged config.
    """
    rules = {f.name: f.metadata.get(RULE) for f in dataclasses.fields(cls)}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in rules:
            raise unknown_setting(cls, key, prefix)
        rule = rules[key]
        if isinstance(rule, Section) and isinstance(value, Mapping):
            check_values(rule.cls, value, f"{name}.")
        elif rule is not None:
            _checked(name, rule, value)


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """``cls(**values)`` with unknown keys and nested mappings handled (errors name the key)."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise unknown_setting(cls, key)
    return cls(**dict(values))


def unknown_setting(cls: type, key: Any, prefix: str = "") -> UnknownSettingError:
    """The error for a key ``cls`` does not have, with the closest known name."""
    known = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(str(key), known, n=1)
    return UnknownSettingError(f"{prefix}{key}", cls.__name__, known,
                               suggestion=f"{prefix}{close[0]}" if close else None)


def rules_of(cls: type) -> dict[str, Rule | None]:
    """Field name -> rule (None for a field declared without one; a test forbids that)."""
    return {f.name: f.metadata.get(RULE) for f in dataclasses.fields(cls)}


def settings_table(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, what it accepts) for every setting of ``cls`` and its sections: the
    table ``docs/reliability.md`` shows, generated from the rules themselves."""
    rows: list[tuple[str, str]] = []
    for name, rule in rules_of(cls).items():
        if isinstance(rule, Section):
            rows += settings_table(rule.cls, f"{prefix}{name}.")
        elif rule is not None:
            rows.append((f"{prefix}{name}", rule.expected))
    return rows


# --------------------------------------------------------------------------- layers of settings


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested settings -> dotted keys (``{'data': {'max_length': 64}}`` -> ``data.max_length``)."""
    out = {}
    for k, val in tree.items():
        if isinstance(val, dict):
            out.update(flatten(val, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = val
    return out


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """The inverse of :func:`flatten` for one key: ``data.max_length`` -> ``tree['data']
    ['max_length']``, making the sections on the way."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, section by section (a nested mapping merges, not replaces)."""
    out = dict(base)
    for k, val in over.items():
        out[k] = merge(out[k], val) if isinstance(val, dict) and isinstance(out.get(k), dict) \
            else val
    return out


def check_layers(cls: type, layers: list[tuple[dict, dict[str, str], str]]) -> dict[str, str]:
    """Check each layer of raw values on its own, in order (an error names the file and line,
    or the flag, that holds the bad value: ``lines`` maps dotted keys to it, ``default`` names
    the layer); return where each dotted key's final value came from."""
    where: dict[str, str] = {}
    for values, lines, default in layers:
        try:
            check_values(cls, values)
        except SettingError as exc:
            raise exc.located(lines.get(exc.setting, default)) from None
        where.update({k: lines.get(k, default) for k in flatten(values)})
    return where

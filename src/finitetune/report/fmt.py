"""Number formatting shared by the report's text (its conclusion) and its views.

Hand-written reports give losses and norms with four decimals; counts are integers and are
shown as integers (``3``, never ``3.0000``), whatever type the log stored them in.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["count", "num", "step", "value"]


def num(x: float | None) -> str:
    """Four decimals in the usual range (as hand-written reports give them), else 4 digits."""
    if x is None:
        return "n/a"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:.4f}"
    return f"{x:.4g}"


def count(x: float | int | None) -> str:
    """An integer quantity (entries, events, tokens, a step): ``3``, never ``3.0000``."""
    if x is None:
        return "n/a"
    if isinstance(x, float) and not x.is_integer():
        return num(x)
    return str(int(x))


def step(s: Any) -> Any:
    """A step number as an int when it is one (JSON and text)."""
    return int(s) if isinstance(s, float) and s.is_integer() else s


def value(v: Any) -> str:
    """Any scalar from a log or a JSON file: integral numbers as integers, floats as
    :func:`num`, None as ``n/a``."""
    if isinstance(v, bool) or v is None:
        return "n/a" if v is None else str(v)
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return count(v)
    if isinstance(v, float):
        return num(v)
    return str(v)

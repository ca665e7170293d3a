"""Per-metric statistics, the loss trend and the learning-rate summary of a parsed log.

Counting NaN and zero entries, giving the range and mean and asking "does the loss go down?"
is what every bug report about a non-finite fine-tune does first; this is that, done the same
way every time. Pure functions over lists of floats (part of the analysis layer).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MetricStats", "Trend", "lr_summary", "metric_stats", "theil_sen", "trend_of",
           "trend_word"]

TREND_MAX_POINTS = 200
"""Theil–Sen is O(n²): longer logs are thinned to this many evenly spaced points."""
MIN_TREND_CHANGE = 0.01
"""A fitted change over the span of less than 1 % of the median loss is "flat", however
significant."""
TAIL_MIN_POINTS = 10
"""Logs with at least this many points also get a trend of their last quarter (``tail``)."""


@dataclass
class MetricStats:
    """Counts and summary of one logged metric; non-finite values are counted, never averaged."""

    name: str
    total: int = 0
    valid: int = 0
    nan: int = 0
    inf: int = 0
    zero: int = 0
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    first: float | None = None
    last: float | None = None
    integer: bool = False
    """Every finite value is a whole number (a count: shown as an integer)."""
    samples: list[tuple[float, float]] = field(default_factory=list)
    """(step, value) of the first three and last two entries, NaN included."""


@dataclass
class Trend:
    """Theil–Sen fit of loss against step: robust to the spikes and NaN that break first-vs-last.

    With fewer than 5 points only the slope's sign is used (``evidence="weak"``); from 5 on, the
    direction must be significant (Sen's 95 % interval excludes 0) *and* the fitted change over
    the span at least 1 % of the median loss. When the interval includes 0 the test found no
    trend at all: ``direction="none"``, ``evidence="none"`` (which is not evidence that the loss
    is flat: a noisy log can hide a fall or a rise). A straight line is only the test: losses decay
    roughly exponentially, so the report shows the observed first and last values, not the
    line's ends (which can extrapolate below zero).
    """

    n: int = 0
    slope: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    first: float | None = None
    """Observed loss of the first point of the fit."""
    last: float | None = None
    """Observed loss of the last point of the fit."""
    first_step: float | None = None
    last_step: float | None = None
    relative_change: float | None = None
    """Fitted change over the span divided by the median loss."""
    direction: str = "unknown"
    """``decreasing`` (falling), ``increasing`` (rising), ``flat`` (a significant change under
    1 % of the median), ``none`` (no significant trend: the interval includes 0) or ``unknown``
    (< 2 points)."""
    evidence: str = "none"
    """``none`` (too few points, or no significant trend), ``weak`` (n < 5: the sign of the
    slope only) or ``strong`` (n >= 5 and the interval excludes 0)."""
    tail: Trend | None = None
    """The same fit over the last quarter of the points (logs of 10 or more points): a loss
    that is flat over the run but climbs at its end is diverging."""


def trend_word(trend: Trend) -> str:
    """The direction in words: decreasing, rising, flat, no significant trend or unknown."""
    return {"increasing": "rising", "none": "no significant trend"}.get(trend.direction,
                                                                        trend.direction)


def metric_stats(name: str, steps: list[float], values: list[float | None]) -> MetricStats:
    """Count entries, finite (valid), NaN, ±inf and exact zeros; summarise the finite ones.

    Vectorised (numpy): ``finitetune watch`` recomputes this on every verdict of a long run.
    """
    import numpy as np

    st = MetricStats(name)
    present = [v for v in values if v is not None]
    arr = np.asarray(present, dtype=np.float64)
    fin = np.isfinite(arr)
    finite = arr[fin]
    st.total, st.valid = len(present), int(fin.sum())
    st.nan = int(np.isnan(arr).sum())
    st.inf = st.total - st.valid - st.nan
    st.zero = int((finite == 0.0).sum())
    if finite.size:
        st.min, st.max = float(finite.min()), float(finite.max())
        st.mean = math.fsum(finite.tolist()) / finite.size
        st.first, st.last = float(finite[0]), float(finite[-1])
        st.integer = bool((finite == np.round(finite)).all())
    idx = [i for i in (*range(min(3, len(values))), len(values) - 2, len(values) - 1)
           if 0 <= i < len(values)] if len(present) == len(values) else None
    if idx is not None:  # every entry has the metric: no need to pair them all up
        st.samples = [(steps[i], float(values[i] or 0.0)) for i in sorted(set(idx))]
    else:
        pairs = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
        st.samples = pairs if len(pairs) <= 5 else pairs[:3] + pairs[-2:]
    return st


def trend_of(points: list[tuple[float, float]]) -> Trend:
    """:func:`theil_sen` of all points, plus that of the last quarter as ``tail``."""
    trend = theil_sen(points)
    if len(points) >= TAIL_MIN_POINTS:
        trend.tail = theil_sen(points[-max(5, len(points) // 4):])
    return trend


def theil_sen(points: list[tuple[float, float]]) -> Trend:
    """Median of pairwise slopes, with Sen's (1968) rank-based 95 % interval."""
    if len(points) > TREND_MAX_POINTS:
        stride = (len(points) - 1) / (TREND_MAX_POINTS - 1)
        points = [points[round(i * stride)] for i in range(TREND_MAX_POINTS)]
    n = len(points)
    slopes = sorted((y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points)
                    for x2, y2 in points[i + 1 :] if x2 != x1)
    if n < 2 or not slopes:
        return Trend(n=n)
    slope = statistics.median(slopes)
    level = statistics.median(abs(y) for _, y in points)
    rel = slope * (points[-1][0] - points[0][0]) / level if level else None
    trend = Trend(n=n, slope=slope, first=points[0][1], last=points[-1][1],
                  first_step=points[0][0], last_step=points[-1][0], relative_change=rel)
    if n < 5:
        trend.evidence = "weak"
        trend.direction = "decreasing" if slope < 0 else "increasing" if slope > 0 else "flat"
        return trend
    big_n = len(slopes)
    c = 1.96 * math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    trend.ci_low = slopes[max(0, math.floor((big_n - c) / 2))]
    trend.ci_high = slopes[min(big_n - 1, math.ceil((big_n + c) / 2))]
    if trend.ci_low <= 0 <= trend.ci_high:
        trend.direction, trend.evidence = "none", "none"  # the test found no trend
        return trend
    trend.evidence = "strong"
    big_change = rel is None or abs(rel) >= MIN_TREND_CHANGE
    if not big_change:
        trend.direction = "flat"
    else:
        trend.direction = "decreasing" if trend.ci_high < 0 else "increasing"
    return trend


def lr_summary(steps: list[float], lrs: list[float | None]) -> dict[str, Any]:
    """First, peak and last learning rate; whether a warm-up was seen; entries at exactly 0."""
    pts = [(s, v) for s, v in zip(steps, lrs, strict=True) if v is not None and math.isfinite(v)]
    if not pts:
        return {"logged": False}
    peak_i = max(range(len(pts)), key=lambda i: pts[i][1])
    zeros = [s for s, v in pts if v == 0.0]
    return {
        "logged": True, "first": pts[0][1], "peak": pts[peak_i][1], "peak_step": pts[peak_i][0],
        "last": pts[-1][1], "warmup": peak_i > 0 and pts[0][1] < pts[peak_i][1],
        "decays": pts[-1][1] < pts[peak_i][1], "zero_entries": len(zeros),
        "first_zero_step": zeros[0] if zeros else None,
    }

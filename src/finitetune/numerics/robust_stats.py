"""Robust location and spread (median / MAD) and the robust z-score built on them.

One owner for the arithmetic that decides what counts as a spike: the gradient guard's spike
detector (:class:`finitetune.guard.policy.SpikeDetector`) and the health report's spike rule
(:mod:`finitetune.report.rules`) both call it, so "6 robust standard deviations" means the same
thing while training and when reading the log afterwards.

Median and MAD because one spike or one inf must not move the reference it is measured against
(a mean and a standard deviation are both dragged by the outlier they should flag). Pure Python
on host floats: no torch, no numpy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["MAD_TO_STD", "RobustScale", "median", "robust_scale", "robust_z"]

MAD_TO_STD = 1.4826
"""MAD x this = the standard deviation of normally distributed noise."""
SCALE_FLOOR = 1e-12
"""Smallest spread: a constant window must not divide by zero."""


def median(ordered: list[float]) -> float:
    """Median of an already sorted, non-empty list."""
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


class RobustScale(NamedTuple):
    """Centre (median) and spread (robust standard deviation) of a window of values."""

    center: float
    scale: float

    def z(self, value: float) -> float:
        """Distance of ``value`` from the centre, in robust standard deviations."""
        return (value - self.center) / self.scale


def robust_scale(window: Iterable[float], min_scale: float = 0.0) -> RobustScale:
    """Median and ``max(1.4826 * MAD, min_scale * |median|, 1e-12)`` of a non-empty window.

    ``min_scale`` floors the spread relative to the level: without it a nearly constant window
    calls every wiggle a spike.
    """
    ordered = sorted(window)
    if not ordered:
        raise ValueError("robust_scale of an empty window")
    center = median(ordered)
    mad = median(sorted(abs(x - center) for x in ordered))
    return RobustScale(center, max(MAD_TO_STD * mad, min_scale * abs(center), SCALE_FLOOR))


def robust_z(window: Iterable[float], value: float, min_scale: float = 0.0) -> float:
    """Robust z-score of ``value`` against ``window`` (see :func:`robust_scale`)."""
    return robust_scale(window, min_scale).z(value)

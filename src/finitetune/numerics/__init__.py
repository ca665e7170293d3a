"""Numerics the whole project shares: its constants, the grouped foreach norm pass, robust
statistics. This package root imports no torch (the report and label validation use it).
"""

from finitetune.numerics.constants import FP16_MAX, IGNORE_INDEX

__all__ = ["FP16_MAX", "IGNORE_INDEX"]

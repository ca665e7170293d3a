"""Numbers the whole project agrees on, defined once.

Pure Python (no torch): the report and the label validation use them without importing torch.
"""

from __future__ import annotations

IGNORE_INDEX = -100
"""Label value of an unsupervised position (prompt, padding): PyTorch's and transformers'
``ignore_index`` default, so labels made here mean the same to every loss."""

FP16_MAX = 65504.0
"""Largest finite float16 (``torch.finfo(torch.float16).max``): an activation, weight or
gradient beyond it is inf in fp16."""

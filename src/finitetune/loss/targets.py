"""Which tokens a causal-LM loss scores: the one definition of shifted targets and of the
supervised-token count.

Position t predicts label t+1 (the convention of transformers' causal-LM loss), so the targets
are the labels shifted left by one, padded with ``ignore_index``; a collator that already
shifted them passes ``shift_labels``. The loss, the Trainer integration (which feeds the guard
each micro-batch's count) and attribution (does a faulty batch supervise anything?) count the
same tokens because they all call :func:`supervised_tokens`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from finitetune.numerics.constants import IGNORE_INDEX

__all__ = ["shifted_targets", "supervised_tokens"]


def shifted_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels`` shifted left by one position, the last position predicting nothing.

    Padding instead of slicing keeps the targets the logits' shape, so logits can be viewed as
    ``(N, V)`` without a copy.
    """
    return F.pad(labels.long(), (0, 1), value=ignore_index)[..., 1:]


def supervised_tokens(inputs: Mapping[str, Any] | Any, *, shift: bool = True,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor | None:
    """Supervised tokens of one micro-batch: ``shift_labels`` as given, else ``labels`` shifted
    when ``shift`` (a Trainer whose model shifts inside its loss) or as they are. A 0-d int64
    device tensor (no host sync); None when the batch has no labels."""
    if not isinstance(inputs, Mapping):
        return None
    labels = inputs.get("shift_labels")
    if not isinstance(labels, torch.Tensor):
        labels = inputs.get("labels")
        if not isinstance(labels, torch.Tensor):
            return None
        if shift:
            labels = labels[..., 1:]
    return labels.ne(ignore_index).sum()

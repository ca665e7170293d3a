"""The guard's running counters: their names, which reason bumps which, and the logged view.

``Guard.counters`` is a plain dict (checkpointed by ``state_dict``, shown in a halt's
diagnosis, read by the report); this module is its schema, so the names live in one place.
"""

from __future__ import annotations

import math
from typing import Any

from finitetune.guard.policy import Reason

__all__ = ["COUNTERS", "LOG_KEYS", "REASON_COUNTER", "log_view", "new_counters"]

COUNTERS = (
    "steps", "applied", "skipped", "nonfinite", "nonfinite_grad", "nonfinite_loss",
    "norm_overflow", "no_valid_tokens", "loss_spikes", "grad_spikes", "warnings", "rollbacks",
    "lr_reductions", "scaler_overflows", "clipped", "empty_micro_batches", "consecutive_skips",
    "last_applied_step", "rank_mismatches", "adaptive_clipped", "moment_resets",
)
REASON_COUNTER = {
    Reason.NONFINITE_GRAD: "nonfinite_grad", Reason.NONFINITE_LOSS: "nonfinite_loss",
    Reason.NORM_OVERFLOW: "norm_overflow", Reason.NO_VALID_TOKENS: "no_valid_tokens",
    Reason.LOSS_SPIKE: "loss_spikes", Reason.GRAD_SPIKE: "grad_spikes",
    Reason.SCALER_OVERFLOW: "scaler_overflows", Reason.RANK_MISMATCH: "rank_mismatches",
}
"""The counter an event's reason adds one to."""
LOG_KEYS = ("skipped", "nonfinite", "no_valid_tokens", "empty_micro_batches", "rollbacks",
            "consecutive_skips")
"""The counters copied into every training log (plus ``spikes`` and ``lr_scale``)."""


def new_counters() -> dict[str, Any]:
    """All counters at 0; ``last_applied_step`` None (no step applied yet)."""
    counters: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
    counters["last_applied_step"] = None
    return counters


def log_view(counters: dict[str, Any], lr_scale: float,
             clip_threshold: float | None = None) -> dict[str, float]:
    """Counters for the Trainer's logs / TensorBoard / W&B, keyed ``guard/<name>``; with
    adaptive clipping also the threshold in force (``guard/clip_threshold``) and the steps it
    cut (``guard/adaptive_clipped``)."""
    out = {f"guard/{k}": float(counters[k]) for k in LOG_KEYS}
    out["guard/spikes"] = float(counters["loss_spikes"] + counters["grad_spikes"])
    out["guard/lr_scale"] = float(lr_scale)
    if clip_threshold is not None:
        if math.isfinite(clip_threshold):  # inf: warming up with no max_grad_norm
            out["guard/clip_threshold"] = float(clip_threshold)
        out["guard/adaptive_clipped"] = float(counters["adaptive_clipped"])
        if counters["moment_resets"]:
            out["guard/moment_resets"] = float(counters["moment_resets"])
    return out

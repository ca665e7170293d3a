"""``metrics.jsonl``: one strict-JSON line per logged optimizer step, written as it happens.

A line is flushed immediately, so a run that dies keeps every step it logged. Non-finite values
are stored as ``null`` with a ``<key>_nonfinite`` flag (see :mod:`finitetune.jsonio`), never as
the bare ``NaN`` token that strict JSON readers reject.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finitetune.jsonio import append_jsonl

# Trainer's end-of-training summary, not a step
_SUMMARY_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second",
                 "total_flos", "train_loss"}


class MetricsCallback(TrainerCallback):
    """Append each training log of the Trainer to ``path`` as a metrics line.

    ``extra`` callables return additional fields for the line (e.g. the loss tracker's
    token-mean window loss and supervised-token count, the guard's counters); they run at
    logging time only, never per step.
    """

    def __init__(self, path: str | Path, extra: list[Any] | None = None) -> None:
        self.path = Path(path)
        self.extra = list(extra or [])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or _SUMMARY_KEYS & set(logs):
            return
        if any(k.startswith("eval_") for k in logs):
            return
        record: dict[str, Any] = {"step": state.global_step}
        for key in ("loss", "grad_norm", "learning_rate", "epoch"):
            if key in logs:
                record[key] = logs[key]
        for provide in self.extra:
            record.update(provide() or {})
        for key, value in logs.items():
            record.setdefault(key, value)
        append_jsonl(self.path, record)

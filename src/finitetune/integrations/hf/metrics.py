"""``metrics.jsonl``: one strict-JSON line per logged optimizer step, written as it happens.

A line is flushed immediately, so a run that dies keeps every step it logged. Non-finite values
are stored as ``null`` with a ``<key>_nonfinite`` flag (see :mod:`finitetune.rundir.jsonio`), never as
the bare ``NaN`` token that strict JSON readers reject.

With a :class:`~finitetune.loss.causal.SafeCausalLMLoss` tracker the line's ``loss`` is the true
token-mean loss of the logging window (NaN stays NaN), not the Trainer's filtered value, which
prints a window of NaN losses as 0.0; the Trainer's own number is kept as ``trainer_loss``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finitetune.rundir.jsonio import append_jsonl

# Trainer's end-of-training summary, not a step
_SUMMARY_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second",
                 "total_flos", "train_loss"}


class MetricsCallback(TrainerCallback):
    """Append each training log of the Trainer to ``path`` as a metrics line.

    Fields: ``step, loss, grad_norm, learning_rate, epoch`` and, with a loss tracker,
    ``tokens`` (supervised tokens in the window), ``micro_batches``, ``empty_microbatches``
    (window) and ``empty_microbatches_total`` (whole run); with the guard, ``skipped`` (steps
    skipped in the window) and its cumulative ``guard/*`` counters.
    """

    def __init__(self, path: str | Path, tracker: Any = None) -> None:
        self.path = Path(path)
        self.tracker = tracker
        self.empty_total = 0
        self._skipped_before = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed run continues the counters it had logged
        last = state.log_history[-1] if state.log_history else {}
        self.empty_total = int(last.get("empty_microbatches_total", 0) or 0)
        self._skipped_before = int(last.get("guard/skipped", 0) or 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or _SUMMARY_KEYS & set(logs) or any(k.startswith("eval_") for k in logs):
            return
        record: dict[str, Any] = {"step": state.global_step}
        for key in ("loss", "grad_norm", "learning_rate", "epoch"):
            if key in logs:
                record[key] = logs[key]
        if self.tracker is not None:
            # one host sync per *log*, not per step
            window = self.tracker.read_and_reset()
            self.empty_total += window["empty_micro_batches"]
            record["trainer_loss"] = logs.get("loss")
            record["loss"] = window["loss"] if window["num_tokens"] else None
            record["tokens"] = window["num_tokens"]
            record["micro_batches"] = window["micro_batches"]
            record["empty_microbatches"] = window["empty_micro_batches"]
            record["empty_microbatches_total"] = self.empty_total
            logs["empty_microbatches_total"] = self.empty_total  # kept in log_history
        if "guard/skipped" in logs:
            record["skipped"] = int(logs["guard/skipped"]) - self._skipped_before
            self._skipped_before = int(logs["guard/skipped"])
        for key, value in logs.items():
            record.setdefault(key, value)
        if state.is_world_process_zero:
            append_jsonl(self.path, record)

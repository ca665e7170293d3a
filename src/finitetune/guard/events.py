"""What the guard tells the outside world: one ``events.jsonl`` line and one warning per event.

Strict JSON only (``dumps_strict``: a NaN grad norm becomes ``null`` plus
``"grad_norm_nonfinite": "nan"``), so jq and the report can read a run that went wrong, which
is the run one most needs to read. Off the hot path: called only for steps that were not
simply applied.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Any

from finitetune.errors import NonFiniteHalt
from finitetune.guard.policy import Reason, StepOutcome
from finitetune.rundir.jsonio import append_jsonl

__all__ = ["EVENTS_FILE", "advice", "event_record", "halt_error", "logger", "write_event"]

EVENTS_FILE = "events.jsonl"
logger = logging.getLogger("finitetune.guard")

_ADVICE = {
    Reason.NONFINITE_GRAD: "gradients became NaN/inf: lower the learning rate, look at the "
    "batches of these steps (events.jsonl), and prefer bf16/fp32 over fp16",
    Reason.NORM_OVERFLOW: "gradients exploded (finite but astronomically large): lower the "
    "learning rate, set max_grad_norm, look for a corrupt batch",
    Reason.NONFINITE_LOSS: "the loss is NaN/inf: check the inputs and labels "
    "(`finitetune check`) and the loss function",
    Reason.NO_VALID_TOKENS: "batches have no supervised token: check the response template "
    "and label masking (`finitetune check` names the examples)",
    Reason.LOSS_SPIKE: "the loss keeps jumping far above its recent level: lower the learning "
    "rate, or raise spike_threshold / set spike_action=warn if the jumps are expected",
    Reason.GRAD_SPIKE: "the grad norm keeps jumping far above its recent level: lower the "
    "learning rate or set max_grad_norm; raise spike_threshold if the jumps are expected",
    Reason.SCALER_OVERFLOW: "fp16 keeps overflowing after the GradScaler calibrated: train in "
    "bf16 or fp32",
    Reason.RANK_MISMATCH: "a rank's replicated gradients or parameters differ from the others "
    "(a faulty device or a desynchronised collective): restart without the named rank's device "
    "and resume from the last checkpoint",
}


def advice(reason: Reason | None) -> str:
    """What to do about a halt for this reason (one sentence)."""
    return _ADVICE.get(reason, "see events.jsonl") if reason else "see events.jsonl"


def event_record(outcome: StepOutcome, counters: dict[str, Any]) -> dict[str, Any]:
    """The ``events.jsonl`` line for a step (non-finite values are handled by ``dumps_strict``)."""
    record: dict[str, Any] = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
        "step": outcome.step,
        "kind": "guard",
        "action": outcome.action.value,
        "reason": outcome.reason.value if outcome.reason else None,
        "applied": outcome.applied,
        "grad_norm": outcome.grad_norm,
        "loss": outcome.loss,
        "tokens": outcome.tokens,
        "micro_batches": outcome.micro_batches,
        "empty_micro_batches": outcome.empty_micro_batches,
        "consecutive_skips": outcome.consecutive_skips,
        "skipped_total": counters.get("skipped"),
        "lr_scale": outcome.lr_scale,
    }
    for key, value in outcome.detail.items():
        record.setdefault(key, value)
    record["message"] = outcome.message
    return record


def write_event(
    output_dir: str | os.PathLike | None, record: dict[str, Any], message: str
) -> None:
    """Append the record to ``output_dir/events.jsonl`` (if given) and log one warning."""
    if output_dir is not None:
        path = Path(output_dir)
        path.mkdir(parents=True, exist_ok=True)
        append_jsonl(path / EVENTS_FILE, record)
    logger.warning("finitetune guard: %s", message)


def halt_error(outcome: StepOutcome, counters: dict[str, Any], last_good_step: int | None
               ) -> NonFiniteHalt:
    """The exception that stops a run, carrying a diagnosis the report can show as is."""
    reason = outcome.reason.value if outcome.reason else "unknown"
    diagnosis = {
        "step": outcome.step,
        "reason": reason,
        "grad_norm": outcome.grad_norm,
        "loss": outcome.loss,
        "consecutive_skips": outcome.consecutive_skips,
        "last_good_step": last_good_step,
        "counters": dict(counters),
        "note": outcome.detail.get("note"),
        "advice": advice(outcome.reason),
    }
    last = "none" if last_good_step is None else str(last_good_step)
    message = (
        f"training halted at step {outcome.step} ({reason}"
        f"{'; ' + outcome.detail['note'] if outcome.detail.get('note') else ''}); "
        f"the model keeps the state of the last applied step ({last}). "
        f"What to do: {advice(outcome.reason)}."
    )
    return NonFiniteHalt(message, diagnosis)

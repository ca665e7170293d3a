"""Diagnosis rules: the known ways a fine-tune fails, each applied to a parsed log.

Each rule looks for one symptom and, when it fires, says what the log shows, what usually
causes it and what to check. Severity decides the verdict: ``critical`` makes a run unhealthy
(exit 1), ``warning`` fails only ``--strict``, ``info`` is noted. The wording rules (absent
metrics are "not logged", "persistent" needs consecutive entries through the last one) are in
:mod:`.base`; the rules are grouped in :mod:`.nonfinite`, :mod:`.progress` and
:mod:`.divergence`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from finitetune.report.records import is_accuracy
from finitetune.report.rules import divergence, nonfinite, progress
from finitetune.report.rules.base import PERSIST_RUN, Context, finding, finite
from finitetune.report.run_status import run_status_findings

__all__ = ["PERSIST_RUN", "Context", "diagnose"]

# symptoms that the guard handles by not applying the step (skip, rollback, lower LR)
_HANDLED_RULES = {"hidden_nan_loss", "nan_loss", "nonfinite_grad", "fp16_skip_pattern",
                  "loss_scale_calibration", "zero_loss", "loss_spikes", "last_loss_high"}
_HANDLING_ACTIONS = {"skip", "rollback", "reduce_lr"}


def diagnose(c: Context) -> list[dict[str, Any]]:
    """Run every rule; return the findings as dicts (see health.Finding).

    In a guarded run a symptom that appears only on entries where the guard did not apply the
    step (its events, or a metrics line with ``skipped`` > 0) was handled: it becomes ``info``
    ("handled by the guard") instead of a warning or a wrong fp16 diagnosis. A symptom on any
    other entry keeps its severity.
    """
    out: list[dict[str, Any]] = []
    for rule in (nonfinite.hidden_nan_loss, nonfinite.nan_loss, nonfinite.nonfinite_grad,
                 progress.first_loss, progress.zero_lr, progress.zero_loss, progress.zero_grad,
                 progress.pinned_norm, divergence.grad_spikes, divergence.loss_spikes,
                 divergence.last_loss, progress.trend, progress.loss_scale_zero,
                 _guard, _events,
                 _eval_dropped, nonfinite.eval_nonfinite, _labels, _empty,
                 run_status_findings):
        out.extend(rule(c))
    handled = _handled_steps(c)
    for f in out:
        if (handled and f["rule"] in _HANDLED_RULES and f["steps"]
                and set(f["steps"]) <= handled):
            f["severity"] = "info"
            f["title"] = f"Handled by the guard: {f['title']}"
            f["check"] = "the guard's events (`finitetune explain`) say what it did"
    return out


def _kind(event: dict[str, Any]) -> str:
    # finitetune's events: kind "guard", what it did under "action"
    return str(event.get("action") or event.get("kind") or "").lower()


def _event_steps(events: list[dict[str, Any]]) -> list[float]:
    return [e["step"] for e in events if isinstance(e.get("step"), (int, float))]


def _handled_steps(c: Context) -> set[float]:
    steps = set(_event_steps([e for e in c.log.events if _kind(e) in _HANDLING_ACTIONS]))
    if c.skipped is not None:
        steps |= {s for s, k in zip(c.steps, c.skipped, strict=True) if k and k > 0}
    return steps


def _guard(c: Context) -> list[dict[str, Any]]:
    out = []
    halts = [e for e in c.log.events if "halt" in _kind(e)]
    if halts:
        last = halts[-1]
        out.append(finding("guard_halt", "critical",
                           f"The guard halted training at step {last.get('step', '?')}: "
                           f"{last.get('reason', 'no reason recorded')}",
                           "The run could not be kept finite; its events say which step and why.",
                           "the events timeline (`finitetune explain`).", _event_steps(halts)))
    rollbacks = [e for e in c.log.events if "rollback" in _kind(e)]
    if rollbacks:
        out.append(finding("guard_rollback", "warning",
                           f"The guard rolled back {len(rollbacks)} time(s)",
                           "A spike or a non-finite step was undone by restoring the last good "
                           "state.", "the events timeline (`finitetune explain`).",
                           _event_steps(rollbacks)))
    return out


def _events(c: Context) -> list[dict[str, Any]]:
    """Events no other rule reads (loss-scaler skips a console log announced, refused saves,
    kinds added later): counted, so that none goes unmentioned."""
    known = {"halt", "rollback", *_HANDLING_ACTIONS, "apply", "guard"}
    other = [e for e in c.log.events if _kind(e) not in known]
    if not other:
        return []
    kinds = Counter(_kind(e) or "event" for e in other)
    text = ", ".join(f"{k} x{n}" for k, n in kinds.items())
    return [finding("events", "info", f"{len(other)} logged event(s): {text}",
                    "Events the run recorded besides the training entries; the plots mark them.",
                    steps=_event_steps(other))]


def _eval_dropped(c: Context) -> list[dict[str, Any]]:
    ev = c.log.eval or {}
    before, after = ev.get("before"), ev.get("after")
    out = []
    if isinstance(before, dict) and isinstance(after, dict):
        for key, a in after.items():
            b = before.get(key)
            if is_accuracy(key) and finite(a) and finite(b) and a < b:
                out.append(finding("eval_dropped", "warning",
                                   f"{key} fell from {b:.4g} before training to {a:.4g} after"))
    return out


def _labels(c: Context) -> list[dict[str, Any]]:
    labels = c.log.labels or {}
    total, usable = labels.get("total"), labels.get("usable")
    if not (isinstance(total, int) and isinstance(usable, int) and usable < total):
        return []
    why = labels.get("explanation")
    return [finding("labels_dropped", "info",
                    f"{total - usable} of {total} training examples had nothing to learn and "
                    "were left out (label validation)", why if isinstance(why, str) else "",
                    "label_report.json names the examples and reasons.")]


def _empty(c: Context) -> list[dict[str, Any]]:
    if not c.steps:
        return [finding("no_steps", "warning", "No training step was logged")]
    return []

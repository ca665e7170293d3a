"""The health report's model: statistics, trend, findings and verdict of a parsed log.

``finitetune.health_report(source)`` is the entry point. This module is the report's analysis
layer: it reads :class:`~finitetune.report.records.ParsedLog` (loaded by
:mod:`finitetune.report.load`) and builds a :class:`HealthReport`, plain data that the views
(:mod:`finitetune.report.render`, :mod:`.html`, :mod:`.plots`, :mod:`.live`) render; it never
imports them. The diagnosis rules (the known ways a fine-tune fails) live in
:mod:`finitetune.report.rules`.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from finitetune.report import evidence, rules
from finitetune.report.load import load
from finitetune.report.records import ParsedLog, is_accuracy
from finitetune.report.stats import MetricStats, Trend, lr_summary, metric_stats, trend_of

__all__ = ["Finding", "HealthReport", "analyse", "health_report"]

DEFAULT_VOCAB = 262_144
"""Vocabulary assumed for foreign logs: the largest in common use (Gemma 3), so the bound
``ln(vocab) + margin`` only flags losses no token-mean cross-entropy start can explain."""
CE_MARGIN = 2.5
"""Nats above ``ln(vocab)`` (a uniform prediction) that a badly initialised head may add."""
NOT_METRICS = ("runtime", "per_second", "preparation_time")
SEVERITIES = ("critical", "warning", "info")
SERIES = ("loss", "grad_norm", "learning_rate", "skipped", "guard/clip_threshold")


@dataclass
class Finding:
    """One diagnosis: what the log shows, what usually causes it, what to check."""

    rule: str
    severity: str
    title: str
    detail: str = ""
    check: str = ""
    steps: list[float] = field(default_factory=list)


@dataclass
class HealthReport:
    """Verdict (``healthy``/``inconclusive``/``warning``/``unhealthy``) with the evidence for it
    (:mod:`finitetune.report.evidence` says what each needs).

    Rendered by :func:`finitetune.report.to_markdown`, ``to_json``, ``to_html``.
    """

    source: str
    kind: str
    verdict: str
    findings: list[Finding]
    metrics: dict[str, MetricStats]
    trend: Trend
    learning_rate: dict[str, Any]
    guard: dict[str, Any]
    eval: dict[str, Any] | None
    labels: dict[str, Any] | None
    summary: dict[str, float]
    vocab: dict[str, Any]
    notes: list[str]
    conclusion: str
    learns: bool | None
    improvement: str | None = None
    """The evaluation that improved (in words), when one did."""
    before: HealthReport | None = None
    series: dict[str, list[Any]] = field(default_factory=dict, repr=False)
    """Per-entry columns (step, loss, grad_norm, learning_rate, skipped, the adaptive clip
    threshold) for the plots."""
    eval_series: dict[str, list[Any]] = field(default_factory=dict, repr=False)
    """Per-evaluation columns (step and every eval metric) for the plots."""
    events: list[dict[str, Any]] = field(default_factory=list, repr=False)
    """Guard events and announced skips (step, kind, action, reason), for plots and ``watch``."""

    @property
    def reasons(self) -> list[str]:
        """Titles of the critical and warning findings: why the verdict is not healthy."""
        return [f.title for f in self.findings if f.severity != "info"]

    def exit_code(self, strict: bool = False) -> int:
        """1 when unhealthy; with ``strict`` also for a warning or an inconclusive log (a gate
        that wants proof of health); else 0."""
        if self.verdict == "unhealthy" or (strict and self.verdict != "healthy"):
            return 1
        return 0


def health_report(
    source: str | os.PathLike | Iterable[Mapping[str, Any]] | ParsedLog,
    *,
    compare: str | os.PathLike | Iterable[Mapping[str, Any]] | ParsedLog | None = None,
    vocab_size: int | None = None,
    max_grad_norm: float | None = None,
) -> HealthReport:
    """Parse ``source`` (run dir, trainer_state.json, JSONL, console text, TensorBoard, MLflow,
    trackio, W&B CSV, log dicts) and judge it.

    ``compare`` is the "before" run for the before/after table and overlaid plots.
    ``vocab_size`` and ``max_grad_norm`` override what the run directory recorded (foreign
    logs rarely say). Raises :class:`finitetune.errors.ReportInputError` for unreadable input.
    """
    report = analyse(load(source), vocab_size=vocab_size, max_grad_norm=max_grad_norm)
    if compare is not None:
        report.before = health_report(compare, vocab_size=vocab_size, max_grad_norm=max_grad_norm)
    return report


def analyse(log: ParsedLog, vocab_size: int | None = None,
            max_grad_norm: float | None = None) -> HealthReport:
    """Statistics, trend, diagnosis and verdict of an already parsed log."""
    steps = [r["step"] for r in log.records]
    cols = {k: [r.get(k) for r in log.records] for k in SERIES}
    keys: set[str] = set().union(*log.records)  # one C-level pass, not a loop per key
    metrics = _metrics(log, steps, cols, keys)
    vocab = vocab_size or log.vocab_size
    vocab_info = {"size": vocab or DEFAULT_VOCAB, "assumed": vocab is None,
                  "loss_bound": math.log(vocab or DEFAULT_VOCAB) + CE_MARGIN}
    trend_pts = [(s, v) for s, v, g in zip(steps, cols["loss"], cols["grad_norm"], strict=True)
                 if v is not None and math.isfinite(v) and (g is None or math.isfinite(g))]
    trend = trend_of(trend_pts)
    ctx = rules.Context(steps=steps, loss=cols["loss"], grad=cols["grad_norm"],
                        lr=cols["learning_rate"], log=log, trend=trend,
                        loss_bound=vocab_info["loss_bound"], vocab_assumed=vocab is None,
                        clip=max_grad_norm if max_grad_norm is not None else log.max_grad_norm,
                        skipped=cols["skipped"] if "skipped" in keys else None)
    findings = [Finding(**f) for f in rules.diagnose(ctx)]
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    severities = {f.severity for f in findings}
    improvement = evidence.eval_improvement(log)
    learns = evidence.learns(evidence.verdict(severities, True), trend, improvement)
    verdict = evidence.verdict(severities, learns)
    notes = list(log.notes)
    if vocab is None and metrics.get("loss"):
        notes.append(f"vocabulary size unknown: assumed {DEFAULT_VOCAB} for the loss bound "
                     f"(pass vocab_size / --vocab-size)")
    eval_keys = [k for k in metrics if k.startswith("eval_")]
    return HealthReport(
        source=log.source, kind=log.kind, verdict=verdict, findings=findings, metrics=metrics,
        trend=trend, learning_rate=lr_summary(steps, cols["learning_rate"]),
        guard=guard_summary(log, cols["skipped"], keys), eval=log.eval, labels=log.labels,
        summary=log.summary, vocab=vocab_info, notes=notes,
        conclusion=evidence.conclusion(
            verdict, [f.title for f in findings if f.severity == ("critical" if verdict ==
                                                                  "unhealthy" else "warning")],
            trend, learns, improvement, len(log.records), "loss" in metrics),
        learns=learns, improvement=improvement, series={"step": steps, **cols},
        eval_series={"step": [r["step"] for r in log.evals],
                     **{k: [r.get(k) for r in log.evals] for k in eval_keys}},
        events=[e for e in log.events if isinstance(e.get("step"), (int, float))],
    )


def _metrics(log: ParsedLog, steps: list[float], cols: dict[str, list[float | None]],
             keys: set[str]) -> dict[str, MetricStats]:
    metrics = {k: metric_stats(k, steps, cols[k]) for k in ("grad_norm", "loss", "learning_rate")
               if any(v is not None for v in cols[k])}
    for key in sorted(k for k in keys if is_accuracy(k)):
        metrics[key] = metric_stats(key, steps, [r.get(key) for r in log.records])
    eval_keys = sorted({k for r in log.evals for k in r
                        if k.startswith("eval_") and not k.endswith(NOT_METRICS)})
    eval_steps = [r["step"] for r in log.evals]
    for key in eval_keys:
        metrics[key] = metric_stats(key, eval_steps, [r.get(key) for r in log.evals])
    return metrics


def _is_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def guard_summary(log: ParsedLog, skipped: list[float | None], keys: set[str]) -> dict[str, Any]:
    """Events by kind and reason, skipped steps, empty micro-batches, guard/* counters."""
    kinds = Counter(str(e.get("action") or e.get("kind") or "event") for e in log.events)
    reasons = Counter(str(e.get("reason")) for e in log.events if e.get("reason"))
    counters = {k: next(r[k] for r in reversed(log.records) if k in r)
                for k in sorted(keys) if k.startswith("guard/")}  # cumulative: the last value
    empty = ([r["empty_microbatches"] for r in log.records
              if _is_finite(r.get("empty_microbatches"))]
             if "empty_microbatches" in keys else [])
    return {
        "events": len(log.events), "by_kind": dict(kinds), "by_reason": dict(reasons),
        "skipped_entries": sum(1 for v in skipped if v), "counters": counters,
        "empty_microbatches": sum(empty) if empty else None,
        # checkpoints refused / restored, resumes, remembered bad samples (report.history)
        "checkpoint_events": [e for e in log.events if e.get("kind") in ("checkpoint", "resume")],
        "bad_samples": log.bad_samples,
    }

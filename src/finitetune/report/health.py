"""Statistics, loss trend and verdict of a training log: the report people used to write by hand.

Counting NaN and zero entries, giving the range and mean and asking "does the loss go down?"
is what every bug report about a non-finite fine-tune does first. Doing it here, the same way
every time, turns a pasted log into a verdict a CI job can gate on. The diagnosis rules (the
failure catalogue, DESIGN.md §3) live in :mod:`finitetune.report.rules`.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from finitetune.report import rules
from finitetune.report.parse import ParsedLog, is_accuracy, load
from finitetune.report.render import num

DEFAULT_VOCAB = 262_144
"""Vocabulary assumed for foreign logs: the largest in common use (Gemma 3), so the bound
``ln(vocab) + margin`` only flags losses no token-mean cross-entropy start can explain."""
CE_MARGIN = 2.5
"""Nats above ``ln(vocab)`` (a uniform prediction) that a badly initialised head may add."""
TREND_MAX_POINTS = 200
"""Theil–Sen is O(n²): longer logs are thinned to this many evenly spaced points."""
MIN_TREND_CHANGE = 0.01
"""A fitted change over the span of less than 1 % of the median loss is "flat", however
significant."""
NOT_METRICS = ("runtime", "per_second", "preparation_time")
SEVERITIES = ("critical", "warning", "info")


@dataclass
class MetricStats:
    """Counts and summary of one logged metric; non-finite values are counted, never averaged."""

    name: str
    total: int = 0
    valid: int = 0
    nan: int = 0
    inf: int = 0
    zero: int = 0
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    first: float | None = None
    last: float | None = None
    samples: list[tuple[float, float]] = field(default_factory=list)
    """(step, value) of the first three and last two entries, NaN included."""


@dataclass
class Trend:
    """Theil–Sen fit of loss against step: robust to the spikes and NaN that break first-vs-last.

    With fewer than 5 points only the slope's sign is used (``evidence="weak"``); from 5 on, the
    direction must be significant (Sen's 95 % interval excludes 0) *and* the fitted change over
    the span at least 1 % of the median loss. A straight line is only the test: losses decay
    roughly exponentially, so the report shows the observed first and last values, not the
    line's ends (which can extrapolate below zero).
    """

    n: int = 0
    slope: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    first: float | None = None
    """Observed loss of the first point of the fit."""
    last: float | None = None
    """Observed loss of the last point of the fit."""
    relative_change: float | None = None
    """Fitted change over the span divided by the median loss."""
    direction: str = "unknown"
    """``decreasing``, ``increasing``, ``flat`` or ``unknown`` (fewer than 2 points)."""
    evidence: str = "none"
    """``none``, ``weak`` (n < 5: sign of the slope) or ``strong`` (n >= 5: tested)."""


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
    """Verdict (``healthy``/``warning``/``unhealthy``) with the evidence for it."""

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
    before: HealthReport | None = None
    series: dict[str, list[Any]] = field(default_factory=dict, repr=False)
    """Per-entry columns (step, loss, grad_norm, learning_rate, skipped) for the plots."""

    @property
    def reasons(self) -> list[str]:
        """Titles of the critical and warning findings: why the verdict is not healthy."""
        return [f.title for f in self.findings if f.severity != "info"]

    def exit_code(self, strict: bool = False) -> int:
        """1 when unhealthy (or, with ``strict``, when there is any warning), else 0."""
        if self.verdict == "unhealthy" or (strict and self.verdict == "warning"):
            return 1
        return 0

    def to_dict(self) -> dict[str, Any]:
        from finitetune.report.render import report_dict

        return report_dict(self)

    def to_json(self) -> str:
        from finitetune.report.render import to_json

        return to_json(self)

    def to_markdown(self) -> str:
        from finitetune.report.render import to_markdown

        return to_markdown(self)

    def to_html(self) -> str:
        from finitetune.report.render import to_html

        return to_html(self)


def health_report(
    source: str | os.PathLike | Iterable[Mapping[str, Any]] | ParsedLog,
    *,
    compare: str | os.PathLike | Iterable[Mapping[str, Any]] | ParsedLog | None = None,
    vocab_size: int | None = None,
    max_grad_norm: float | None = None,
) -> HealthReport:
    """Parse ``source`` (run dir, trainer_state.json, JSONL, console text, log dicts); judge it.

    ``compare`` is the "before" run for the before/after table. ``vocab_size`` and
    ``max_grad_norm`` override what the run directory recorded (foreign logs rarely say).
    Raises :class:`finitetune.errors.ReportInputError` for input it cannot read.
    """
    log = load(source)
    report = analyse(log, vocab_size=vocab_size, max_grad_norm=max_grad_norm)
    if compare is not None:
        report.before = health_report(compare, vocab_size=vocab_size, max_grad_norm=max_grad_norm)
    return report


def analyse(log: ParsedLog, vocab_size: int | None = None,
            max_grad_norm: float | None = None) -> HealthReport:
    """Statistics, trend, diagnosis and verdict of an already parsed log."""
    steps = [r["step"] for r in log.records]
    cols = {k: [r.get(k) for r in log.records]
            for k in ("loss", "grad_norm", "learning_rate", "skipped")}
    metrics = {k: metric_stats(k, steps, cols[k]) for k in ("grad_norm", "loss", "learning_rate")
               if any(v is not None for v in cols[k])}
    keys: set[str] = set().union(*log.records)  # one C-level pass, not a loop per key
    extra = sorted(k for k in keys if is_accuracy(k))
    for key in extra:
        metrics[key] = metric_stats(key, steps, [r.get(key) for r in log.records])
    eval_keys = sorted({k for r in log.evals for k in r
                        if k.startswith("eval_") and not k.endswith(NOT_METRICS)})
    for key in eval_keys:
        metrics[key] = metric_stats(key, [r["step"] for r in log.evals],
                                    [r.get(key) for r in log.evals])
    vocab = vocab_size or log.vocab_size
    vocab_info = {"size": vocab or DEFAULT_VOCAB, "assumed": vocab is None,
                  "loss_bound": math.log(vocab or DEFAULT_VOCAB) + CE_MARGIN}
    clip = max_grad_norm if max_grad_norm is not None else log.max_grad_norm
    trend_pts = [(s, v) for s, v, g in zip(steps, cols["loss"], cols["grad_norm"], strict=True)
                 if v is not None and math.isfinite(v) and (g is None or math.isfinite(g))]
    trend = theil_sen(trend_pts)
    ctx = rules.Context(steps=steps, loss=cols["loss"], grad=cols["grad_norm"],
                        lr=cols["learning_rate"], log=log, trend=trend,
                        loss_bound=vocab_info["loss_bound"], vocab_assumed=vocab is None,
                        clip=clip)
    findings = [Finding(**f) for f in rules.diagnose(ctx)]
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    verdict = ("unhealthy" if any(f.severity == "critical" for f in findings)
               else "warning" if any(f.severity == "warning" for f in findings) else "healthy")
    learns = _learns(verdict, trend)
    notes = list(log.notes)
    if vocab is None and metrics.get("loss"):
        notes.append(f"vocabulary size unknown: assumed {DEFAULT_VOCAB} for the loss bound "
                     f"(pass vocab_size / --vocab-size)")
    return HealthReport(
        source=log.source, kind=log.kind, verdict=verdict, findings=findings, metrics=metrics,
        trend=trend, learning_rate=lr_summary(steps, cols["learning_rate"]),
        guard=guard_summary(log, cols["skipped"], keys), eval=log.eval, labels=log.labels,
        summary=log.summary, vocab=vocab_info, notes=notes,
        conclusion=_conclusion(verdict, findings, trend, learns, len(log.records)),
        learns=learns, series={"step": steps, **cols},
    )


def metric_stats(name: str, steps: list[float], values: list[float | None]) -> MetricStats:
    """Count entries, finite (valid), NaN, ±inf and exact zeros; summarise the finite ones."""
    st = MetricStats(name)
    present = [v for v in values if v is not None]
    finite = [v for v in present if math.isfinite(v)]
    st.total, st.valid = len(present), len(finite)
    st.nan = sum(1 for v in present if v != v)  # NaN is the only value unequal to itself
    st.inf = st.total - st.valid - st.nan
    st.zero = finite.count(0.0)
    if finite:
        st.min, st.max = min(finite), max(finite)
        st.mean = math.fsum(finite) / len(finite)
        st.first, st.last = finite[0], finite[-1]
    pairs = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
    st.samples = pairs if len(pairs) <= 5 else pairs[:3] + pairs[-2:]
    return st


def theil_sen(points: list[tuple[float, float]]) -> Trend:
    """Median of pairwise slopes, with Sen's (1968) rank-based 95 % interval."""
    if len(points) > TREND_MAX_POINTS:
        stride = (len(points) - 1) / (TREND_MAX_POINTS - 1)
        points = [points[round(i * stride)] for i in range(TREND_MAX_POINTS)]
    n = len(points)
    slopes = sorted((y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points)
                    for x2, y2 in points[i + 1 :] if x2 != x1)
    if n < 2 or not slopes:
        return Trend(n=n)
    slope = statistics.median(slopes)
    level = statistics.median(abs(y) for _, y in points)
    rel = slope * (points[-1][0] - points[0][0]) / level if level else None
    trend = Trend(n=n, slope=slope, first=points[0][1], last=points[-1][1], relative_change=rel)
    if n < 5:
        trend.evidence = "weak"
        trend.direction = "decreasing" if slope < 0 else "increasing" if slope > 0 else "flat"
        return trend
    big_n = len(slopes)
    c = 1.96 * math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    trend.ci_low = slopes[max(0, math.floor((big_n - c) / 2))]
    trend.ci_high = slopes[min(big_n - 1, math.ceil((big_n + c) / 2))]
    trend.evidence = "strong"
    big_change = rel is None or abs(rel) >= MIN_TREND_CHANGE
    if trend.ci_high < 0 and big_change:
        trend.direction = "decreasing"
    elif trend.ci_low > 0 and big_change:
        trend.direction = "increasing"
    else:
        trend.direction = "flat"
    return trend


def lr_summary(steps: list[float], lrs: list[float | None]) -> dict[str, Any]:
    """First, peak and last learning rate; whether a warm-up was seen; entries at exactly 0."""
    pts = [(s, v) for s, v in zip(steps, lrs, strict=True) if v is not None and math.isfinite(v)]
    if not pts:
        return {"logged": False}
    peak_i = max(range(len(pts)), key=lambda i: pts[i][1])
    zeros = [s for s, v in pts if v == 0.0]
    return {
        "logged": True, "first": pts[0][1], "peak": pts[peak_i][1], "peak_step": pts[peak_i][0],
        "last": pts[-1][1], "warmup": peak_i > 0 and pts[0][1] < pts[peak_i][1],
        "decays": pts[-1][1] < pts[peak_i][1], "zero_entries": len(zeros),
        "first_zero_step": zeros[0] if zeros else None,
    }


def _learns(verdict: str, trend: Trend) -> bool | None:
    if verdict == "unhealthy":
        return False
    if trend.direction == "decreasing":
        return True
    if trend.direction in ("flat", "increasing") and trend.evidence == "strong":
        return False
    return None


def _conclusion(verdict: str, findings: list[Finding], trend: Trend, learns: bool | None,
                entries: int) -> str:
    worst = [f.title for f in findings if f.severity == ("critical" if verdict == "unhealthy"
                                                         else "warning")]
    if verdict == "unhealthy":
        text = f"Unhealthy: {worst[0]}. The model does not learn from these steps."
    elif learns:
        weak = f" (weak evidence: only {trend.n} points)" if trend.evidence == "weak" else ""
        text = (f"The model learns: the loss falls from {num(trend.first)} to "
                f"{num(trend.last)} over {trend.n} entries{weak}.")
    elif entries == 0:
        text = "No training step was logged, so nothing shows that the model learns."
    elif trend.direction == "unknown":
        text = "Too few finite losses to tell whether the model learns."
    else:
        text = f"No sign of learning: the loss is {trend.direction} ({trend.evidence} evidence)."
    if verdict == "warning":
        text += " Warnings: " + "; ".join(worst) + "."
    return text


def _is_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def guard_summary(log: ParsedLog, skipped: list[float | None], keys: set[str]) -> dict[str, Any]:
    """Guard events by kind and reason, skipped steps, empty micro-batches, guard/* counters."""
    kinds = Counter(str(e.get("action") or e.get("kind") or "event") for e in log.events)
    reasons = Counter(str(e.get("reason")) for e in log.events if e.get("reason"))
    counters = {k: next(r[k] for r in reversed(log.records) if k in r)
                for k in sorted(keys) if k.startswith("guard/")}  # cumulative: the last value
    empty = [r["empty_microbatches"] for r in log.records if _is_finite(r.get("empty_microbatches"))]
    return {
        "events": len(log.events), "by_kind": dict(kinds), "by_reason": dict(reasons),
        "skipped_entries": sum(1 for v in skipped if v), "counters": counters,
        "empty_microbatches": sum(empty) if empty else None,
        # checkpoints refused / restored, resumes, remembered bad samples (report.history)
        "checkpoint_events": [e for e in log.events if e.get("kind") in ("checkpoint", "resume")],
        "bad_samples": log.bad_samples,
    }

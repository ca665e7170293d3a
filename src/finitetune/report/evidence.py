"""What shows that a model learns, and the verdict that follows from it.

A report may call a run HEALTHY only on evidence: a loss trend the test finds significant
(Theil–Sen over at least 5 points, :mod:`finitetune.report.stats`) or an evaluation that
improved (``eval.json`` before -> after, or the log's evaluations first -> last), with no
finding of warning or critical severity (the rules check the last entries: a non-finite or
far-too-high last loss is a finding). A log that shows neither a problem nor learning (four
entries, a loss that is not logged, evaluations that did not move) is INCONCLUSIVE: nothing
is wrong in it, and nothing in it shows the fine-tune works.

Verdicts, worst first: ``unhealthy`` (a critical finding), ``warning``, ``inconclusive``,
``healthy``. Exit codes (:meth:`finitetune.report.health.HealthReport.exit_code`): 1 for
unhealthy; 0 for warning and inconclusive, 1 for either with ``--strict``; 0 for healthy.
"""

from __future__ import annotations

import math
from typing import Any

from finitetune.report.fmt import num
from finitetune.report.records import ParsedLog, is_accuracy
from finitetune.report.stats import Trend, trend_word

__all__ = ["conclusion", "eval_improvement", "learns", "verdict"]

EVAL_MIN_CHANGE = 0.01
"""An eval loss must fall by at least 1 % (relative) to count as an improvement."""


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _better(key: str, before: Any, after: Any) -> bool:
    if not (_finite(before) and _finite(after)):
        return False
    if is_accuracy(key):
        return after > before
    if key.endswith("loss"):
        return after < before * (1 - EVAL_MIN_CHANGE)
    return False


def eval_improvement(log: ParsedLog) -> str | None:
    """The evaluation that shows learning, in words, or None: a metric of ``eval.json`` better
    after training than before, else the log's evaluations better at the last than at the
    first (an accuracy higher, an eval loss at least 1 % lower); none that got worse counts."""
    ev = log.eval or {}
    before, after = ev.get("before"), ev.get("after")
    if isinstance(before, dict) and isinstance(after, dict):
        keys = [k for k in after if _better(k, before.get(k), after.get(k))]
        worse = [k for k in after if _better(k, after.get(k), before.get(k))]
        if keys and not worse:
            k = keys[0]
            return f"{k} {num(before[k])} before training -> {num(after[k])} after (eval.json)"
    series: dict[str, list[float]] = {}
    for rec in log.evals:
        for k, v in rec.items():
            if k != "step" and _finite(v):
                series.setdefault(k, []).append(float(v))
    for k, values in sorted(series.items()):
        if len(values) >= 2 and _better(k, values[0], values[-1]):
            return (f"{k} {num(values[0])} at the first evaluation -> {num(values[-1])} at the "
                    f"last ({len(values)} evaluations)")
    return None


def learns(worst: str, trend: Trend, improvement: str | None) -> bool | None:
    """True on evidence (a significant fall of the loss, or an improved evaluation), False
    when the run is unhealthy or the loss is significantly flat or rising, else None."""
    if worst == "unhealthy":
        return False
    if (trend.direction == "decreasing" and trend.evidence == "strong") or improvement:
        return True
    if trend.direction in ("flat", "increasing") and trend.evidence == "strong":
        return False
    return None


def verdict(severities: set[str], learning: bool | None) -> str:
    """The verdict from the findings' severities and the evidence of learning."""
    if "critical" in severities:
        return "unhealthy"
    if "warning" in severities:
        return "warning"
    return "healthy" if learning else "inconclusive"


def _no_evidence(trend: Trend, entries: int, loss_logged: bool) -> str:
    """Why nothing shows learning (for an inconclusive or warning verdict)."""
    if entries == 0:
        return "no training step was logged"
    if not loss_logged:
        return "the loss is not logged"
    if trend.direction == "unknown":
        return f"only {trend.n} finite loss value(s) with a finite grad norm"
    if trend.evidence == "weak":
        return (f"{trend.n} loss values are too few to test a trend (it went "
                f"{num(trend.first)} -> {num(trend.last)}; a test needs 5)")
    if trend.direction == "none":
        return f"no significant trend over {trend.n} points"
    return f"the loss is {trend.direction}"


def conclusion(worst: str, titles: list[str], trend: Trend, learning: bool | None,
               improvement: str | None, entries: int, loss_logged: bool) -> str:
    """The report's last paragraph: the verdict in words, with its evidence."""
    if worst == "unhealthy":
        return f"Unhealthy: {titles[0]}. The model does not learn from these steps."
    if learning:
        if trend.direction == "decreasing" and trend.evidence == "strong":
            text = (f"The model learns: the loss falls from {num(trend.first)} to "
                    f"{num(trend.last)} over {trend.n} entries (a significant trend).")
        else:
            text = f"The model learns: {improvement}."
    elif learning is False:
        text = f"No sign of learning: the loss is {trend_word(trend)} (significant over {trend.n} points)."
    elif worst == "inconclusive":
        text = ("Inconclusive: nothing in this log shows that the model learns ("
                f"{_no_evidence(trend, entries, loss_logged)}, and no evaluation that "
                "improved); nothing in it is wrong either. Log more steps (logging_steps) or "
                "evaluate before and after training to tell.")
    else:
        text = (f"Not shown that the model learns: {_no_evidence(trend, entries, loss_logged)}"
                ".")
    if worst == "warning":
        text += " Warnings: " + "; ".join(titles) + "."
    return text

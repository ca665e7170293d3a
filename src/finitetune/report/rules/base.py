"""What every diagnosis rule shares: the context it reads and the words it may use.

A finding states only what the numbers show. A metric that is absent is "not logged", never
"finite"; a pattern is "persistent" only when it holds on a run of consecutive entries that
reaches the last one (:data:`PERSIST_RUN`), never because of one entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from finitetune.report.records import ParsedLog
from finitetune.report.stats import Trend

Opt = float | None

PERSIST_RUN = 3
"""Consecutive entries through the last one that make a pattern persistent (or all entries,
when the log has fewer)."""


@dataclass
class Context:
    """The columns of a parsed log that the rules read."""

    steps: list[float]
    loss: list[Opt]
    grad: list[Opt]
    lr: list[Opt]
    log: ParsedLog
    trend: Trend
    loss_bound: float
    vocab_assumed: bool
    clip: float | None
    skipped: list[Opt] | None = None
    """The ``skipped`` column of finitetune's metrics (None when not logged)."""

    def eval_bad_steps(self) -> list[float]:
        """Steps of evaluations whose ``eval_loss`` is NaN or inf."""
        return [r["step"] for r in self.log.evals if bad(r.get("eval_loss"))]


def finite(x: Opt) -> bool:
    return x is not None and math.isfinite(x)


def bad(x: Opt) -> bool:
    return x is not None and not math.isfinite(x)


def fmt(x: float) -> str:
    """A step or a count as an integer when it is one, else 4 significant digits."""
    return f"{int(x)}" if float(x).is_integer() else f"{x:.4g}"


def finding(rule: str, severity: str, title: str, detail: str = "", check: str = "",
            steps: list[float] | None = None) -> dict[str, Any]:
    """One finding as a dict (see :class:`finitetune.report.health.Finding`)."""
    return {"rule": rule, "severity": severity, "title": title, "detail": detail,
            "check": check, "steps": list(steps or [])[:20]}


def runs(flags: list[bool]) -> list[tuple[int, int]]:
    """(start, end) index pairs, end inclusive, of consecutive True values."""
    out, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            out.append((start, i - 1))
            start = None
    return out


def tail_run(hits: list[int], among: list[int]) -> int:
    """How many of the last entries of ``among`` (indices of entries that have the metric),
    in a row, are in ``hits``."""
    hit = set(hits)
    n = 0
    for i in reversed(among):
        if i not in hit:
            break
        n += 1
    return n


def persistent(hits: list[int], among: list[int]) -> bool:
    """The pattern holds on at least :data:`PERSIST_RUN` consecutive entries through the last
    one (on every entry, when there are fewer)."""
    return bool(among) and tail_run(hits, among) >= min(PERSIST_RUN, len(among))


def where(hits: list[int], among: list[int], steps: list[float]) -> str:
    """"every logged entry", "3 of 10 entries, the last 3 in a row" or "2 of 10 entries
    (steps 4, 7)": how many, and whether they reach the end."""
    if len(hits) == len(among):
        return "every logged entry" if len(among) > 1 else "the only logged entry"
    tail = tail_run(hits, among)
    text = f"{len(hits)} of {len(among)} entries"
    if tail == len(hits):
        return f"{text}, the last {tail} in a row" if tail > 1 else f"{text}: the last one"
    if len(hits) <= 3:
        word = "step" if len(hits) == 1 else "steps"
        return f"{text} ({word} {', '.join(fmt(steps[i]) for i in hits)})"
    return f"{text}, first at step {fmt(steps[hits[0]])}"

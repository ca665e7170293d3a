"""The terminal views of ``finitetune watch``: a live panel (``rich``) and one-line changes.

The panel shows what the seed report counts (entries, valid, NaN, inf, zero, last value),
sparklines of the loss and the grad norm with non-finite entries marked, the verdict and its
reasons, and the latest events (guard decisions, refused saves, loss-scaler skips) as they
arrive. Without a terminal, :func:`change_line` gives one line per change of verdict.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from finitetune.parsing.terminal import printable
from finitetune.report.fmt import count, num, step

if TYPE_CHECKING:
    from finitetune.report.health import HealthReport

__all__ = ["BARS", "change_line", "panel", "sparkline"]

BARS = "▁▂▃▄▅▆▇█"
BAD = "×"
"""Drawn for a NaN/inf entry: a broken step must show up as a gap, not vanish."""
SPARK_WIDTH = 60
_STYLE = {"healthy": "bold green", "inconclusive": "bold cyan", "warning": "bold yellow",
          "unhealthy": "bold red", "waiting": "dim"}


def sparkline(values: list[float | None], width: int = SPARK_WIDTH) -> str:
    """The last ``width`` logged values as block characters; NaN/inf as ``×``."""
    vals = [v for v in values if v is not None][-width:]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return BAD * len(vals)
    lo, hi = min(finite), max(finite)
    span = (hi - lo) or 1.0
    return "".join(BARS[min(7, int((v - lo) / span * 7.999))] if math.isfinite(v) else BAD
                   for v in vals)


def change_line(report: HealthReport, previous: str | None) -> str:
    """``12:03:04 step 120: healthy -> unhealthy: <reasons>``."""
    steps = report.series.get("step") or [0]
    text = (f"{time.strftime('%H:%M:%S')} step {step(steps[-1])}: "
            f"{previous + ' -> ' if previous else ''}{report.verdict}")
    if report.reasons:
        text += ": " + "; ".join(report.reasons)
    return printable(text)


def panel(report: HealthReport | None, source: str, events: list[dict[str, Any]],
          waiting_for: str = "") -> Any:
    """The live view as a ``rich`` renderable."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    if report is None:
        return Panel(Text(printable(f"waiting for {waiting_for or source} …"), style="dim"),
                     title=Text(printable(f"finitetune watch: {source}")))
    head = Text()
    head.append(report.verdict.upper(), style=_STYLE.get(report.verdict, ""))
    steps = report.series.get("step") or []
    head.append(f"  {len(steps)} entries, last step {step(steps[-1]) if steps else '-'}")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("metric", "entries", "valid", "NaN", "inf", "zero", "last", f"last {SPARK_WIDTH}"):
        table.add_column(col, justify="left" if col.startswith(("metric", "last ")) else "right")
    for name in ("loss", "grad_norm", "learning_rate", "eval_loss"):
        st = report.metrics.get(name)
        if st is None:
            table.add_row(name, "not logged", "", "", "", "", "", "")
            continue
        column = report.eval_series.get(name) if name.startswith("eval_") else \
            report.series.get(name)
        table.add_row(name, str(st.total), str(st.valid), _red(st.nan), _red(st.inf),
                      str(st.zero), (count if st.integer else num)(st.last),
                      sparkline(column or []) if name in ("loss", "grad_norm") else "")
    parts: list[Any] = [head, table]
    reasons = [f for f in report.findings if f.severity != "info"]
    if reasons:
        parts.append(Text(printable("\n".join(f"[{f.severity}] {f.title}" for f in reasons[:6])),
                          style="yellow" if report.verdict == "warning" else "red"))
    if events:
        parts.append(Text(printable("events: " + "; ".join(
            f"step {step(e.get('step'))} {e.get('action') or e.get('kind') or 'event'}"
            + (f" ({e['reason']})" if e.get("reason") else "") for e in events[-5:])),
            style="cyan"))
    return Panel(Group(*parts), title=Text(printable(f"finitetune watch: {source}")))


def _red(n: int) -> str:
    return f"[red]{n}[/red]" if n else "0"

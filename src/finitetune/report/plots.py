"""PNG plots of loss, grad norm and learning rate, with NaN/inf and skipped steps marked.

A NaN cannot be drawn as a point, which is exactly why plots of broken runs look deceptively
clean; every non-finite entry is therefore marked on the step axis. matplotlib is imported
here only, lazily, with the Agg backend: the report must work on headless CI machines and
``import finitetune.report`` must stay cheap.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finitetune.report.health import HealthReport

MAX_POINTS = 5000
"""Points drawn per line; longer series are thinned (markers of bad steps are kept)."""
PLOTS = (("loss", "Loss"), ("grad_norm", "Gradient norm (pre-clip)"),
         ("learning_rate", "Learning rate"))


def render_pngs(report: HealthReport) -> list[tuple[str, bytes]]:
    """(title, PNG bytes) for each logged series; the ``--compare`` run is drawn dashed."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    runs = [("after" if report.before is not None else "run", report.series)]
    if report.before is not None:
        runs.append(("before", report.before.series))
    out = []
    for key, title in PLOTS:
        if not any(v is not None for _, s in runs for v in s.get(key, [])):
            continue
        fig = Figure(figsize=(8, 2.8), dpi=90)
        ax = fig.add_subplot()
        marked = False
        for label, series in runs:
            marked |= _draw(ax, label, series, key, dashed=label == "before")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1 or marked:
            ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        out.append((f"{title} by step", buf.getvalue()))
    return out


def _draw(ax, label: str, series: dict, key: str, dashed: bool) -> bool:
    steps, values = series.get("step", []), series.get(key, [])
    skipped = series.get("skipped") or [None] * len(steps)
    pts = [(s, v) for s, v in zip(steps, values, strict=True)
           if v is not None and math.isfinite(v)]
    bad = [s for s, v in zip(steps, values, strict=True) if v is not None and not math.isfinite(v)]
    skip = [s for s, k in zip(steps, skipped, strict=True) if k]
    stride = max(1, len(pts) // MAX_POINTS)
    pts = pts[::stride]
    if pts:
        style = "--" if dashed else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, lw=1.2,
                marker="o" if len(pts) < 50 else None, ms=3, label=label)
        if key == "grad_norm" and min(p[1] for p in pts) > 0 and (
                max(p[1] for p in pts) / min(p[1] for p in pts) > 100):
            ax.set_yscale("log")
    # y in axes coordinates: the marks sit on the step axis whatever the data's scale
    axis = ax.get_xaxis_transform()
    if bad:
        shown = bad[:: max(1, len(bad) // MAX_POINTS)]
        ax.plot(shown, [0.02] * len(shown), "+" if dashed else "x",
                color="#7b1fa2" if dashed else "#b3261e", ms=8, transform=axis,
                clip_on=False, label=f"{label}: NaN/inf ({len(bad)})")
    if skip:
        shown = skip[:: max(1, len(skip) // MAX_POINTS)]
        ax.plot(shown, [0.06] * len(shown), "|", color="#9a6700", ms=9, transform=axis,
                clip_on=False, label=f"{label}: skipped steps ({len(skip)})")
    return bool(bad or skip)

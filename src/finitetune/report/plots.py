"""PNG plots of loss, grad norm, learning rate and eval metrics, with events marked.

A NaN cannot be drawn as a point, which is exactly why plots of broken runs look deceptively
clean; every non-finite entry is therefore marked on the step axis, and so is every event the
run recorded (guard skips and rollbacks, refused saves, loss-scaler skips: any kind, each in its
own colour). A run with adaptive clipping also gets its threshold drawn on the grad-norm plot
(a norm above the line was cut to it). A ``--compare`` run is overlaid, dashed. matplotlib is
imported here only, lazily, with the Agg backend: the report must work on headless CI machines
and ``import finitetune.report`` must stay cheap.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finitetune.report.health import HealthReport

MAX_POINTS = 5000
"""Points drawn per line; longer series are thinned (markers of bad steps are kept)."""
PLOTS = (("loss", "Loss"), ("grad_norm", "Gradient norm (pre-clip)"),
         ("learning_rate", "Learning rate"))
THRESHOLD = "guard/clip_threshold"
"""The adaptive clip threshold in force at each logged step (``GuardConfig(clip="adaptive")``),
drawn on the grad-norm plot."""
EVENT_COLOURS = ("#b3261e", "#1565c0", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f", "#5d4037")


def render_pngs(report: HealthReport) -> list[tuple[str, bytes]]:
    """(title, PNG bytes) for each logged series; the ``--compare`` run is drawn dashed."""
    out = []
    for title, fig in figures(report):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        out.append((f"{title} by step", buf.getvalue()))
    return out


def figures(report: HealthReport) -> list[tuple[str, Any]]:
    """(title, matplotlib Figure) for each logged series, events marked, runs overlaid."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    runs = [("after" if report.before is not None else "run", report)]
    if report.before is not None:
        runs.append(("before", report.before))
    out = []
    for key, title in (*PLOTS, *_eval_plots(report)):
        if not any(v is not None for _, r in runs for v in _column(r, key)):
            continue
        fig = Figure(figsize=(8, 2.8), dpi=90)
        ax = fig.add_subplot()
        for label, r in runs:
            dashed = label == "before"
            _draw(ax, label, r.series, key, dashed)
            if key == "grad_norm":
                _draw_threshold(ax, label, r.series, dashed)
            if key == "loss" and r.eval_series.get("eval_loss"):
                _draw(ax, f"{label}: eval_loss", r.eval_series, "eval_loss", dashed, eval_=True)
            elif key.startswith("eval_"):
                _draw(ax, label, r.eval_series, key, dashed, eval_=True)
        _mark_events(ax, report.events)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        out.append((title, fig))
    return out


def _eval_plots(report: HealthReport) -> list[tuple[str, str]]:
    """Eval metrics other than eval_loss (drawn on the loss plot), one plot each."""
    keys = [k for k in report.eval_series if k not in ("step", "eval_loss")]
    return [(k, f"Evaluation: {k}") for k in keys]


def _column(r: HealthReport, key: str) -> list[Any]:
    if key.startswith("eval_"):
        return r.eval_series.get(key, [])
    return r.series.get(key, [])


def _draw(ax: Any, label: str, series: dict, key: str, dashed: bool, eval_: bool = False) -> None:
    steps, values = series.get("step", []), series.get(key, [])
    if not values:
        return
    skipped = series.get("skipped") or [None] * len(steps)
    pts = [(s, v) for s, v in zip(steps, values, strict=True)
           if v is not None and math.isfinite(v)]
    bad = [s for s, v in zip(steps, values, strict=True) if v is not None and not math.isfinite(v)]
    skip = [s for s, k in zip(steps, skipped, strict=True) if k] if not eval_ else []
    pts = pts[:: max(1, len(pts) // MAX_POINTS)]
    if pts:
        style = ("--" if dashed else "-") if not eval_ else (":" if dashed else "-.")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, lw=1.2,
                marker="s" if eval_ else ("o" if len(pts) < 50 else None), ms=3, label=label)
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


def _draw_threshold(ax: Any, label: str, series: dict, dashed: bool) -> None:
    """The adaptive clip threshold as a step line: a norm above it was cut to (at most) it."""
    pts = [(s, v) for s, v in zip(series.get("step", []), series.get(THRESHOLD) or [],
                                  strict=False) if v is not None and math.isfinite(v)]
    if not pts:
        return
    pts = pts[:: max(1, len(pts) // MAX_POINTS)]
    ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", lw=1.0,
            ls=":" if dashed else "-", color="#6d4c41", alpha=0.8,
            label=f"{label}: adaptive clip threshold")


def event_kind(event: dict[str, Any]) -> str:
    """What an event says happened: the guard's action, else its kind (any kind is shown)."""
    return str(event.get("action") or event.get("kind") or "event")


def _mark_events(ax: Any, events: list[dict[str, Any]]) -> None:
    """A vertical line per event, one colour and one legend entry per kind."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    for e in events:
        by_kind[event_kind(e)].append(float(e["step"]))
    for i, (kind, steps) in enumerate(sorted(by_kind.items())):
        colour = EVENT_COLOURS[i % len(EVENT_COLOURS)]
        shown = steps[:: max(1, len(steps) // 500)]
        for j, s in enumerate(shown):
            ax.axvline(s, color=colour, lw=0.9, alpha=0.55, ls=(0, (4, 2)),
                       label=f"event: {kind} ({len(steps)})" if j == 0 else None)

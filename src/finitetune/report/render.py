"""Markdown, strict JSON and self-contained HTML renderings of a :class:`HealthReport`.

Markdown and HTML are built from one list of sections, so they cannot drift apart, and the HTML
renderer escapes every string it is given: log lines, file names and event reasons come from
users and must not become markup. JSON goes through :mod:`finitetune.jsonio`, so NaN is
``null`` plus a ``*_nonfinite`` flag, never a bare token that strict readers reject.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
from typing import TYPE_CHECKING, Any

from finitetune.jsonio import dumps_strict
from finitetune.report.history import history_items

if TYPE_CHECKING:
    from finitetune.report.health import HealthReport, MetricStats

SCHEMA_VERSION = 1
LABELS = {"grad_norm": "Gradient norms", "loss": "Loss values", "learning_rate": "Learning rate"}
Block = tuple[str, Any]  # ("p", text) | ("ul", [text]) | ("table", (header, rows))


def num(x: float | None) -> str:
    """Four decimals in the usual range (as hand-written reports give them), else 4 digits."""
    if x is None:
        return "n/a"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:.4f}"
    return f"{x:.4g}"


def step(s: Any) -> Any:
    return int(s) if isinstance(s, float) and s.is_integer() else s


def value_range(st: MetricStats) -> str:
    return "n/a" if st.min is None else f"{num(st.min)}–{num(st.max)}"


# ------------------------------------------------------------------------------------- JSON --
def report_dict(r: HealthReport) -> dict[str, Any]:
    """Plain data of the report (what ``report.json`` holds); non-finite floats stay floats."""
    metrics = {}
    for name, st in r.metrics.items():
        d = dataclasses.asdict(st)
        d["samples"] = [{"step": step(s), "value": v} for s, v in st.samples]
        metrics[name] = d
    findings = [dict(dataclasses.asdict(f), steps=[step(s) for s in f.steps]) for f in r.findings]
    return {
        "schema_version": SCHEMA_VERSION, "source": r.source, "kind": r.kind,
        "verdict": r.verdict, "exit_code": r.exit_code(), "learns": r.learns,
        "conclusion": r.conclusion, "reasons": r.reasons, "findings": findings,
        "metrics": metrics, "loss_trend": dataclasses.asdict(r.trend),
        "learning_rate": {k: step(v) if k.endswith("step") else v
                          for k, v in r.learning_rate.items()},
        "guard": r.guard, "eval": r.eval, "labels": r.labels, "summary": r.summary,
        "vocab": r.vocab, "notes": r.notes,
        "before": report_dict(r.before) if r.before is not None else None,
    }


def to_json(r: HealthReport) -> str:
    """Strict JSON (no NaN/Infinity tokens), indented."""
    return dumps_strict(report_dict(r), indent=2) + "\n"


# --------------------------------------------------------------------------------- sections --
def _stat_rows(st: MetricStats) -> list[list[str]]:
    samples = ", ".join(f"{num(v)} (step {step(s)})" for s, v in st.samples)
    return [["Total entries", str(st.total)], ["Valid (finite)", str(st.valid)],
            ["NaN", str(st.nan)], ["Inf", str(st.inf)], ["Zero", str(st.zero)],
            ["Range", value_range(st)], ["Mean", num(st.mean)], ["Sample values", samples]]


def _trend_text(r: HealthReport) -> str:
    t = r.trend
    if t.direction == "unknown":
        return f"Trend: unknown (only {t.n} finite loss value(s) with a finite grad norm)."
    text = (f"Trend: {t.direction}. Theil–Sen slope {t.slope:.4g} per step over {t.n} points; "
            f"loss {num(t.first)} → {num(t.last)}")
    if t.evidence == "weak":
        return text + " (weak evidence: fewer than 5 points, only the sign of the slope counts)."
    return text + (f"; 95 % interval of the slope [{t.ci_low:.3g}, {t.ci_high:.3g}] "
                   "(decreasing: the interval lies below 0 and the fitted fall is at least 1 % "
                   "of the median loss).")


def _lr_text(lr: dict[str, Any]) -> str:
    if not lr.get("logged"):
        return "No learning rate was logged."
    return (f"First {lr['first']:.4g}, peak {lr['peak']:.4g} at step {step(lr['peak_step'])}, "
            f"last {lr['last']:.4g}; warm-up seen: {'yes' if lr['warmup'] else 'no'}; "
            f"decays: {'yes' if lr['decays'] else 'no'}; entries at 0.0: {lr['zero_entries']}.")


def _compare_rows(before: HealthReport, after: HealthReport) -> list[list[str]]:
    rows = [["Verdict", before.verdict, after.verdict]]
    for name in ("grad_norm", "loss"):
        b, a = before.metrics.get(name), after.metrics.get(name)
        label = "Grad norm" if name == "grad_norm" else "Loss"
        for field, get in (("entries", lambda s: str(s.total)), ("valid", lambda s: str(s.valid)),
                           ("NaN", lambda s: str(s.nan)), ("zero", lambda s: str(s.zero)),
                           ("range", value_range), ("mean", lambda s: num(s.mean))):
            rows.append([f"{label} {field}", get(b) if b else "n/a", get(a) if a else "n/a"])
    rows.append(["Loss trend", before.trend.direction, after.trend.direction])
    rows.append(["Diagnosis", "; ".join(before.reasons) or "none",
                 "; ".join(after.reasons) or "none"])
    return rows


def sections(r: HealthReport) -> list[tuple[str, list[Block]]]:
    """The report's content, format-neutral: rendered by :func:`to_markdown` and :func:`to_html`."""
    learns = {True: "yes", False: "no", None: "not shown"}[r.learns]
    summary: list[Block] = [
        ("strong", f"Verdict: {r.verdict.upper()} (exit code {r.exit_code()}; "
                   f"{r.exit_code(strict=True)} with --strict)"),
        ("p", f"Source: {r.source} ({r.kind.replace('_', ' ')}, {len(r.series.get('step', []))} "
              f"training entries). Model learns: {learns}."),
        ("findings", r.findings) if r.findings else ("p", "Diagnosis: no problem found."),
    ]
    out: list[tuple[str, list[Block]]] = [("Summary", summary)]
    for name in ("grad_norm", "loss"):
        st = r.metrics.get(name)
        blocks: list[Block] = ([("table", (["", "value"], _stat_rows(st)))] if st
                               else [("p", "Not logged.")])
        if name == "loss" and st:
            blocks.append(("p", _trend_text(r)))
        out.append((LABELS[name], blocks))
    out.append(("Learning rate", [("p", _lr_text(r.learning_rate))]))
    others = [st for n, st in r.metrics.items() if n not in LABELS]
    if others or r.eval:
        blocks = []
        if others:
            head = ["metric", "entries", "valid", "NaN", "inf", "zero", "range", "mean", "last"]
            blocks.append(("table", (head, [[s.name, str(s.total), str(s.valid), str(s.nan),
                                             str(s.inf), str(s.zero), value_range(s),
                                             num(s.mean), num(s.last)] for s in others])))
        ev = r.eval or {}
        if isinstance(ev.get("before"), dict) or isinstance(ev.get("after"), dict):
            b, a = ev.get("before") or {}, ev.get("after") or {}
            keys = [k for k in {**b, **a} if isinstance(b.get(k, a.get(k)), (int, float))]
            blocks.append(("table", (["eval.json", "before training", "after training"],
                                     [[k, _any(b.get(k)), _any(a.get(k))] for k in keys])))
        out.append(("Evaluation", blocks))
    g = r.guard
    if g.get("events") or g.get("skipped_entries") or g.get("counters") or g.get(
            "empty_microbatches"):
        items = [f"events: {g['events']} ({_counts(g['by_kind'])})",
                 f"reasons: {_counts(g['by_reason'])}",
                 f"entries marked skipped: {g['skipped_entries']}",
                 f"empty micro-batches (summed over entries): {_any(g['empty_microbatches'])}"]
        items += [f"{k} (last value): {_any(v)}" for k, v in g["counters"].items()]
        out.append(("Guard", [("ul", items)]))
    history = history_items(g)
    if history:
        out.append(("Checkpoints, restarts and skipped samples", [("ul", history)]))
    if r.labels:
        out.append(("Labels", [("ul", [_label_item(k, v) for k, v in r.labels.items()])]))
    if r.before is not None:
        out.append(("Before / after", [("table", (["", "before", "after"],
                                                  _compare_rows(r.before, r)))]))
    conclusion: list[Block] = [("p", r.conclusion)]
    if r.notes:
        conclusion.append(("ul", [f"note: {n}" for n in r.notes]))
    out.append(("Conclusion", conclusion))
    return out


def _label_item(key: str, value: Any) -> str:
    """Counts and scalars in full; per-example lists and previews only by size."""
    small = isinstance(value, dict) and len(value) <= 12 and all(
        isinstance(v, (int, float, str, bool)) or v is None for v in value.values())
    if isinstance(value, (dict, list)) and not small:
        return f"{key}: {len(value)} entries (see label_report.json)"
    text = _any(value)
    return f"{key}: {text[:300]}…" if len(text) > 300 else f"{key}: {text}"


def _any(v: Any) -> str:
    if isinstance(v, float):
        return num(v)
    if isinstance(v, dict):
        return _counts(v)
    return "n/a" if v is None else str(v)


def _counts(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {_any(v)}" for k, v in d.items()) or "none"


# --------------------------------------------------------------------------------- Markdown --
def to_markdown(r: HealthReport) -> str:
    """The hand-written report's shape: summary, grad norms, losses, comparison, conclusion."""
    lines = ["# Training health report", ""]
    for title, blocks in sections(r):
        lines += [f"## {title}", ""]
        for kind, body in blocks:
            if kind == "p":
                lines += [_md(body), ""]
            elif kind == "strong":
                lines += [f"**{_md(body)}**", ""]
            elif kind == "findings":
                lines += ["Diagnosis:", ""]
                for f in body:
                    lines.append(f"- **[{f.severity}] {_md(f.title)}**")
                    lines += [f"  - {label}: {_md(text)}" for label, text in
                              (("Why", f.detail), ("Check", f.check)) if text]
                lines.append("")
            elif kind == "ul":
                lines += [f"- {_md(item)}" for item in body] + [""]
            else:
                header, rows = body
                lines.append("| " + " | ".join(_cell(h) for h in header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
                lines.append("")
    return "\n".join(lines)


def _md(text: str) -> str:
    # user text must not open HTML tags in a markdown viewer; escaping "<" alone is enough and
    # keeps the text readable in a terminal
    return text.replace("<", "&lt;").replace("\n", " ")


def _cell(text: str) -> str:
    return _md(text).replace("|", "\\|")


# ------------------------------------------------------------------------------------- HTML --
_CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .6rem;
text-align:left}.verdict-healthy{color:#176f2c}.verdict-warning{color:#9a6700}
.verdict-unhealthy{color:#b3261e}img{max-width:100%}"""


def to_html(r: HealthReport) -> str:
    """One self-contained file: CSS inline, plots as base64 PNG, every string escaped."""
    from finitetune.report import plots

    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>finitetune health report: {esc(r.source)}</title>",
             f"<style>{_CSS}</style></head><body>", "<h1>Training health report</h1>"]
    try:
        images = plots.render_pngs(r)
    except Exception as exc:  # a plotting failure must not cost the user the report
        images = []
        parts.append(f"<p>plots unavailable: {esc(type(exc).__name__)}: {esc(str(exc))}</p>")
    for i, (title, blocks) in enumerate(sections(r)):
        parts.append(f"<h2>{esc(title)}</h2>")
        for kind, body in blocks:
            if kind == "p":
                parts.append(f"<p>{esc(body)}</p>")
            elif kind == "strong":
                parts.append(f'<p class="verdict-{esc(r.verdict)}"><strong>{esc(body)}'
                             "</strong></p>")
            elif kind == "findings":
                parts.append("<ul>" + "".join(
                    f"<li><strong>[{esc(f.severity)}] {esc(f.title)}</strong>"
                    + "".join(f"<br>{label}: {esc(text)}" for label, text in
                              (("Why", f.detail), ("Check", f.check)) if text)
                    + "</li>" for f in body) + "</ul>")
            elif kind == "ul":
                parts.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in body) + "</ul>")
            else:
                header, rows = body
                parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                             + "</tr>" + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row)
                                                 + "</tr>" for row in rows) + "</table>")
        if i == 0 and images:
            parts.append("<h2>Plots</h2>")
            for alt, png in images:
                data = base64.b64encode(png).decode("ascii")
                parts.append(f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{esc(alt)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

"""Markdown and strict-JSON views of a :class:`HealthReport`, and the sections both share.

The report's rendering layer: Markdown and HTML (:mod:`finitetune.report.html`) are built from
one list of :func:`sections`, so they cannot drift apart. JSON goes through
:mod:`finitetune.rundir.jsonio`, so NaN is ``null`` plus a ``*_nonfinite`` flag, never a bare token
that strict readers reject. Counts are integers wherever they appear.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from finitetune.parsing.terminal import printable
from finitetune.report.fmt import count, num, step, value
from finitetune.report.history import history_items
from finitetune.report.stats import trend_word
from finitetune.rundir.jsonio import dumps_strict

if TYPE_CHECKING:
    from finitetune.report.health import HealthReport
    from finitetune.report.stats import MetricStats

__all__ = ["num", "report_dict", "sections", "step", "to_json", "to_markdown", "value_range"]

SCHEMA_VERSION = 1
LABELS = {"grad_norm": "Gradient norms", "loss": "Loss values", "learning_rate": "Learning rate"}
Block = tuple[str, Any]  # ("p", text) | ("ul", [text]) | ("table", (header, rows))
_DIRECTION_RULE = {
    "decreasing": "decreasing: the interval lies below 0 and the fitted fall is at least 1 % of "
                  "the median loss",
    "increasing": "rising: the interval lies above 0 and the fitted rise is at least 1 % of the "
                  "median loss",
    "flat": "flat: the interval lies on one side of 0 but the fitted change is under 1 % of "
            "the median loss",
}


def value_range(st: MetricStats) -> str:
    fmt = count if st.integer else num
    return "n/a" if st.min is None else f"{fmt(st.min)}–{fmt(st.max)}"


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
    fmt = count if st.integer else num
    samples = ", ".join(f"{fmt(v)} (step {step(s)})" for s, v in st.samples)
    return [["Total entries", str(st.total)], ["Valid (finite)", str(st.valid)],
            ["NaN", str(st.nan)], ["Inf", str(st.inf)], ["Zero", str(st.zero)],
            ["Range", value_range(st)], ["Mean", num(st.mean)], ["Sample values", samples]]


def trend_text(r: HealthReport) -> str:
    """The loss trend in one paragraph, with the rule of the direction it names."""
    t = r.trend
    if t.direction == "unknown":
        return f"Trend: unknown (only {t.n} finite loss value(s) with a finite grad norm)."
    if t.direction == "none":
        text = (f"Trend: no significant trend over {t.n} points (Theil–Sen slope {t.slope:.4g} "
                f"per step; its 95 % interval [{t.ci_low:.3g}, {t.ci_high:.3g}] includes 0; "
                f"loss {num(t.first)} → {num(t.last)}). This is not evidence that the loss is "
                "flat: the points are too few or too noisy to show a direction.")
    else:
        text = (f"Trend: {trend_word(t)}. Theil–Sen slope {t.slope:.4g} per step over {t.n} "
                f"points; loss {num(t.first)} → {num(t.last)}")
        if t.evidence == "weak":
            return text + (" (weak evidence: fewer than 5 points, only the sign of the slope "
                           "counts; not enough to show that the model learns).")
        text += (f"; 95 % interval of the slope [{t.ci_low:.3g}, {t.ci_high:.3g}] "
                 f"({_DIRECTION_RULE[t.direction]}).")
    if (t.direction == "decreasing" and (t.last or 0) > (t.first or 0)) or (
            t.direction == "increasing" and (t.last or 0) < (t.first or 0)):
        text += (f" The last point ({num(t.last)}) goes against that direction: the fit is "
                 "robust to single points, and the findings say what happened at the end.")
    tail = t.tail
    if tail is not None and tail.direction not in ("unknown", "none", t.direction):
        text += (f" Over the last {tail.n} points it is {trend_word(tail)}: {num(tail.first)} → "
                 f"{num(tail.last)}.")
    return text


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
            rows.append([f"{label} {field}", get(b) if b else "not logged",
                         get(a) if a else "not logged"])
    rows.append(["Loss trend", trend_word(before.trend), trend_word(after.trend)])
    rows.append(["Diagnosis", "; ".join(before.reasons) or "none",
                 "; ".join(after.reasons) or "none"])
    return rows


def _metric_sections(r: HealthReport) -> list[tuple[str, list[Block]]]:
    out: list[tuple[str, list[Block]]] = []
    for name in ("grad_norm", "loss"):
        st = r.metrics.get(name)
        blocks: list[Block] = ([("table", (["", "value"], _stat_rows(st)))] if st
                               else [("p", "Not logged.")])
        if name == "loss" and st:
            blocks.append(("p", trend_text(r)))
        out.append((LABELS[name], blocks))
    out.append(("Learning rate", [("p", _lr_text(r.learning_rate))]))
    others = [st for n, st in r.metrics.items() if n not in LABELS]
    ev = r.eval or {}
    if others or ev:
        blocks = []
        if others:
            head = ["metric", "entries", "valid", "NaN", "inf", "zero", "range", "mean", "last"]
            blocks.append(("table", (head, [
                [s.name, str(s.total), str(s.valid), str(s.nan), str(s.inf), str(s.zero),
                 value_range(s), num(s.mean), (count if s.integer else num)(s.last)]
                for s in others])))
        if isinstance(ev.get("before"), dict) or isinstance(ev.get("after"), dict):
            b, a = ev.get("before") or {}, ev.get("after") or {}
            keys = [k for k in {**b, **a} if isinstance(b.get(k, a.get(k)), (int, float))]
            blocks.append(("table", (["eval.json", "before training", "after training"],
                                     [[k, _any(b.get(k)), _any(a.get(k))] for k in keys])))
        out.append(("Evaluation", blocks))
    return out


def _guard_section(r: HealthReport) -> list[tuple[str, list[Block]]]:
    g = r.guard
    if not (g.get("events") or g.get("skipped_entries") or g.get("counters")
            or g.get("empty_microbatches")):
        return []
    items = [f"events: {g['events']} ({_counts(g['by_kind'])})",
             f"reasons: {_counts(g['by_reason'])}",
             f"entries marked skipped: {g['skipped_entries']}",
             f"empty micro-batches (summed over entries): {value(g['empty_microbatches'])}"]
    items += [f"{k} (last value): {value(v)}" for k, v in g["counters"].items()]
    return [("Guard and events", [("ul", items)])]


def sections(r: HealthReport) -> list[tuple[str, list[Block]]]:
    """The report's content, format-neutral: rendered by :func:`to_markdown` and
    :func:`finitetune.report.html.to_html`."""
    learns = {True: "yes", False: "no", None: "not shown"}[r.learns]
    summary: list[Block] = [
        ("strong", f"Verdict: {r.verdict.upper()} (exit code {r.exit_code()}; "
                   f"{r.exit_code(strict=True)} with --strict)"),
        ("p", f"Source: {r.source} ({r.kind.replace('_', ' ')}, {len(r.series.get('step', []))} "
              f"training entries). Model learns: {learns}."),
        ("findings", r.findings) if r.findings else ("p", "Diagnosis: no problem found."),
    ]
    out: list[tuple[str, list[Block]]] = [("Summary", summary)]
    out += _metric_sections(r)
    out += _guard_section(r)
    history = history_items(r.guard)  # refused saves, resumes, rollbacks, remembered samples
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


def _label_item(key: str, v: Any) -> str:
    """Counts and scalars in full; per-example lists and previews only by size."""
    small = isinstance(v, dict) and len(v) <= 12 and all(
        isinstance(x, (int, float, str, bool)) or x is None for x in v.values())
    if isinstance(v, (dict, list)) and not small:
        return f"{key}: {len(v)} entries (see label_report.json)"
    text = _counts(v) if isinstance(v, dict) else value(v)
    return f"{key}: {text[:300]}…" if len(text) > 300 else f"{key}: {text}"


def _any(v: Any) -> str:
    """A value of eval.json: floats with four decimals (a rate of 1.0 is not a count)."""
    if isinstance(v, float):
        return num(v)
    return value(v)


def _counts(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {value(v)}" for k, v in d.items()) or "none"


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
    return printable("\n".join(lines))  # names and messages from the log: no escapes


def _md(text: str) -> str:
    # user text must not open HTML tags in a markdown viewer; escaping "<" alone is enough and
    # keeps the text readable in a terminal
    return text.replace("<", "&lt;").replace("\n", " ")


def _cell(text: str) -> str:
    return _md(text).replace("|", "\\|")

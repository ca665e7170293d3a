"""The HTML view: one self-contained file, CSS inline, plots as base64 PNG, text escaped.

Log lines, file names and event reasons come from users and must not become markup: every
string goes through :func:`html.escape`. The page has no script, so it renders the same in any
browser, with nothing to fail in its console (a test opens it in headless Chromium).
"""

from __future__ import annotations

import base64
import html
from typing import TYPE_CHECKING, Any

from finitetune.parsing.terminal import printable
from finitetune.report.fmt import step
from finitetune.report.render import sections

if TYPE_CHECKING:
    from finitetune.report.health import HealthReport

__all__ = ["to_html"]

MAX_EVENT_ROWS = 200
_CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .6rem;
text-align:left}.verdict-healthy{color:#176f2c}.verdict-warning{color:#9a6700}
.verdict-unhealthy{color:#b3261e}img{max-width:100%}figure{margin:1rem 0}"""


def to_html(r: HealthReport) -> str:
    """The whole page."""
    from finitetune.report import plots

    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>finitetune health report: {esc(r.source)}</title>",
             '<link rel="icon" href="data:,">',  # no favicon request: nothing 404s
             f"<style>{_CSS}</style></head><body>", "<h1>Training health report</h1>"]
    try:
        images = plots.render_pngs(r)
    except Exception as exc:  # a plotting failure must not cost the user the report
        images = []
        parts.append(f"<p>plots unavailable: {esc(type(exc).__name__)}: {esc(str(exc))}</p>")
    for i, (title, blocks) in enumerate(sections(r)):
        parts.append(f"<h2>{esc(title)}</h2>")
        parts += [_block(kind, body, r.verdict) for kind, body in blocks]
        if i == 0 and images:
            parts.append("<h2>Plots</h2>")
            for alt, png in images:
                data = base64.b64encode(png).decode("ascii")
                parts.append(f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{esc(alt)}</figcaption></figure>")
            parts.append(_events_table(r))
    parts.append("</body></html>")
    return printable("\n".join(p for p in parts if p) + "\n")  # no escape reaches a terminal


def _block(kind: str, body: Any, verdict: str) -> str:
    esc = html.escape
    if kind == "p":
        return f"<p>{esc(str(body))}</p>"
    if kind == "strong":
        return f'<p class="verdict-{esc(verdict)}"><strong>{esc(str(body))}</strong></p>'
    if kind == "findings":
        return "<ul>" + "".join(
            f"<li><strong>[{esc(f.severity)}] {esc(f.title)}</strong>"
            + "".join(f"<br>{label}: {esc(text)}" for label, text in
                      (("Why", f.detail), ("Check", f.check)) if text)
            + "</li>" for f in body) + "</ul>"
    if kind == "ul":
        return "<ul>" + "".join(f"<li>{esc(x)}</li>" for x in body) + "</ul>"
    header, rows = body
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                      for row in rows) + "</table>")


def _events_table(r: HealthReport) -> str:
    """The events marked on the plots, step by step (the first 200)."""
    if not r.events:
        return ""
    from finitetune.report.plots import event_kind

    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(str(step(e['step'])))}</td><td>{esc(event_kind(e))}</td>"
        f"<td>{esc(str(e.get('reason') or ''))}</td></tr>" for e in r.events[:MAX_EVENT_ROWS])
    more = (f"<p>… and {len(r.events) - MAX_EVENT_ROWS} more.</p>"
            if len(r.events) > MAX_EVENT_ROWS else "")
    return ("<h3>Events marked on the plots</h3><table><tr><th>step</th><th>event</th>"
            f"<th>reason</th></tr>{rows}</table>{more}")

"""The HTML report: events and refused saves marked on the plots, eval metrics plotted, a
before/after comparison overlaid, integers as integers; and it renders in a real headless
Chromium (Debian's package) with no console message at all."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from finitetune.report import health_report, to_html
from finitetune.report.plots import figures
from finitetune.rundir.jsonio import append_jsonl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _run(tmp_path: Path, name: str, broken: bool) -> Path:
    run = tmp_path / name
    run.mkdir()
    for i in range(1, 21):
        bad = broken and i >= 15
        append_jsonl(run / "metrics.jsonl", {
            "step": i, "loss": 0.0 if bad else 3.0 - 0.1 * i,
            "grad_norm": math.nan if bad else 1.0 + 0.05 * (i % 4), "learning_rate": 1e-3,
            "skipped": int(i == 8 and not broken), "empty_microbatches": 0})
    if not broken:
        append_jsonl(run / "events.jsonl", {"step": 8, "kind": "guard", "action": "skip",
                                            "reason": "nonfinite_grad"})
        append_jsonl(run / "events.jsonl", {"step": 12, "kind": "save_refused",
                                            "reason": "non-finite weights <script>"})
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    after = _run(tmp, "after", broken=False)
    evals = "\n".join(str({"eval_loss": 2.5 - 0.2 * k, "eval_accuracy": 0.5 + 0.1 * k,
                           "epoch": k}) for k in range(1, 4))
    r = health_report(after, compare=_run(tmp, "before", broken=True))
    # eval metrics from a second source, as the Trainer logs them beside the run
    r.eval_series = health_report(evals + "\n" + str({"loss": 1.0, "grad_norm": 1.0})).eval_series
    r.eval_series["step"] = [5.0, 10.0, 15.0]
    return r


def test_plots_mark_every_event_kind_plot_evals_and_overlay_the_before_run(report):
    figs = dict(figures(report))
    assert set(figs) == {"Loss", "Gradient norm (pre-clip)", "Learning rate",
                         "Evaluation: eval_accuracy"}
    for title, fig in figs.items():
        labels = fig.axes[0].get_legend_handles_labels()[1]
        assert "event: skip (1)" in labels and "event: save_refused (1)" in labels, title
    loss_labels = figs["Loss"].axes[0].get_legend_handles_labels()[1]
    assert {"after", "before", "after: eval_loss", "after: skipped steps (1)"} <= set(loss_labels)
    grad_labels = figs["Gradient norm (pre-clip)"].axes[0].get_legend_handles_labels()[1]
    assert "before: NaN/inf (6)" in grad_labels  # the broken run's NaN norms, on the axis
    before_line = next(ln for ln in figs["Loss"].axes[0].get_lines() if ln.get_label() == "before")
    assert before_line.get_linestyle() == "--"


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["alt"])
        self._in_td = tag == "td"

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)


def test_html_page_has_the_plots_events_and_integers(report):
    page = to_html(report)
    parsed = _Page()
    parsed.feed(page)
    assert parsed.imgs == ["Loss by step", "Gradient norm (pre-clip) by step",
                           "Learning rate by step", "Evaluation: eval_accuracy by step"]
    assert "<h3>Events marked on the plots</h3>" in page
    assert "non-finite weights &lt;script&gt;" in page and "<script>" not in page
    i = parsed.cells.index("save_refused")
    assert parsed.cells[i - 1: i + 2] == ["12", "save_refused", "non-finite weights <script>"]
    assert "empty micro-batches (summed over entries): 0" in page
    assert re.search(r"<td>Grad norm NaN</td><td>6</td><td>0</td>", page)


CONSOLE = re.compile(r":CONSOLE[:(]")


def _chromium(html_path: Path) -> tuple[str, list[str]]:
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", "--dump-dom", html_path.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, [ln for ln in proc.stderr.splitlines() if CONSOLE.search(ln)]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package "
                    "`chromium`; .ci/run installs it)")
def test_html_renders_in_headless_chromium_without_console_errors(report, tmp_path):
    control = tmp_path / "control.html"  # the check can fail: a page that logs an error
    control.write_text('<!DOCTYPE html><html><body><script>console.error("x"); nope();'
                       "</script></body></html>")
    assert len(_chromium(control)[1]) == 2
    page = tmp_path / "report.html"
    page.write_text(to_html(report), encoding="utf-8")
    dom, console = _chromium(page)
    assert console == []
    assert "<h1>Training health report</h1>" in dom and dom.count("<img ") == 4
    assert "Events marked on the plots" in dom

"""Health report of a training run: read any log, judge it, render it.

Layers, each importing only the ones above it:

1. records and parsing primitives: :mod:`.records`, :mod:`.names` (the one table of metric
   names), :mod:`.fmt`, :mod:`.console`, :mod:`.fragments`;
2. format detection and loading: :mod:`.load`, :mod:`.run_reader`, :mod:`.tensorboard`,
   :mod:`.trackers`, :mod:`.follow` (incremental, for ``finitetune watch``);
3. analysis, the model: :mod:`.health`, :mod:`.stats`, :mod:`.rules`;
4. rendering, the views: :mod:`.render` (Markdown, JSON), :mod:`.html`, :mod:`.plots`,
   :mod:`.live` (the terminal view of ``watch``).

``finitetune.health_report(source)`` is the entry point; :func:`write_reports` is what the main
job calls at the end of a run (also after an early stop) to leave ``report.md``,
``report.json`` and ``report.html`` in the run directory. Nothing here imports torch or
transformers: the report runs on anyone's logs, anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from finitetune.report.health import HealthReport, health_report
from finitetune.report.html import to_html
from finitetune.report.render import report_dict, to_json, to_markdown
from finitetune.report.run_reader import load_run_dir
from finitetune.rundir import files as run_files
from finitetune.rundir.jsonio import write_text_atomic

__all__ = ["HealthReport", "health_report", "report_dict", "to_html", "to_json", "to_markdown",
           "write_reports"]


def write_reports(run_dir: str | os.PathLike, *, vocab_size: int | None = None,
                  max_grad_norm: float | None = None) -> HealthReport:
    """Judge ``run_dir`` and write its three reports atomically; returns the report.

    Tolerates a run that stopped early (missing or half-written files): the report of a
    halted run is the one that matters most.
    """
    run_dir = Path(run_dir)
    report = health_report(load_run_dir(run_dir), vocab_size=vocab_size,
                           max_grad_norm=max_grad_norm)
    write_text_atomic(run_dir / run_files.REPORT_MD, to_markdown(report))
    write_text_atomic(run_dir / run_files.REPORT_JSON, to_json(report))
    write_text_atomic(run_dir / run_files.REPORT_HTML, to_html(report))
    return report

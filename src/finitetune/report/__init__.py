"""Health report of a training run: parse any log, judge it, render it.

``finitetune.health_report(source)`` is the entry point; :func:`write_reports` is what the main
job calls at the end of a run (also after an early stop) to leave ``report.md``,
``report.json`` and ``report.html`` in the run directory. Nothing here imports torch or
transformers: the report runs on anyone's logs, anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from finitetune import run_files
from finitetune.jsonio import write_text_atomic
from finitetune.report.health import HealthReport, health_report
from finitetune.report.run_reader import load_run_dir

__all__ = ["HealthReport", "health_report", "write_reports"]


def write_reports(run_dir: str | os.PathLike, *, vocab_size: int | None = None,
                  max_grad_norm: float | None = None) -> HealthReport:
    """Judge ``run_dir`` and write its three reports atomically; returns the report.

    Tolerates a run that stopped early (missing or half-written files): the report of a
    halted run is the one that matters most.
    """
    run_dir = Path(run_dir)
    report = health_report(load_run_dir(run_dir), vocab_size=vocab_size,
                           max_grad_norm=max_grad_norm)
    write_text_atomic(run_dir / run_files.REPORT_MD, report.to_markdown())
    write_text_atomic(run_dir / run_files.REPORT_JSON, report.to_json())
    write_text_atomic(run_dir / run_files.REPORT_HTML, report.to_html())
    return report

"""The rule that reads a finitetune run's ``status.json`` (``run_files.STATUS``).

A run that failed after it started, or that the guard halted, is unhealthy whatever its logged
steps look like: the report opens with ``FAILED at step N: <error>``. A run still marked
``running`` did not finish (or is still going): a warning. Kept apart from ``rules.py`` so the
run-directory contract (written by ``run_writer.write_status``) has one reader.
"""

from __future__ import annotations

from typing import Any


def run_status_findings(c: Any) -> list[dict[str, Any]]:
    """Findings (``rules._f`` dicts) from ``c.log.status``; none for a completed run or a log
    that is not a finitetune run directory. A halt the guard's events already report is left
    to the guard rule."""
    status = c.log.status or {}
    state, step = status.get("state"), status.get("step")
    error = str(status.get("error") or "no error recorded").strip().splitlines()[0][:200]
    halt_event = any("halt" in str(e.get("action") or "") for e in c.log.events)
    if state == "failed" or (state == "halted" and not halt_event):
        return [_finding(f"run_{state}", "critical", f"{state.upper()} at step {step}: {error}",
                         "The run stopped before it finished (status.json records why); its "
                         "logged steps cannot make it healthy.",
                         "the error above; `finitetune explain` for the guard's events.")]
    if state == "running":
        return [_finding("run_unfinished", "warning",
                         f"The run did not finish: status.json says running (step {step})",
                         "Either it is still training, or its process was killed.",
                         "whether the process is alive; `finitetune train --resume` continues "
                         "it from its last checkpoint.")]
    return []


def _finding(rule: str, severity: str, title: str, detail: str, check: str) -> dict[str, Any]:
    return {"rule": rule, "severity": severity, "title": title, "detail": detail,
            "check": check, "steps": []}

"""The rule that reads a finitetune run's ``status.json`` (``run_files.STATUS``).

A run that failed after it started, or that the guard halted, is unhealthy whatever its logged
steps look like: the report opens with ``FAILED at step N: <error>``. A run still marked
``running`` is still going if a process holds the directory's lock (``run_files.lock_holder``),
was killed if the lock was taken here and is free (``run_files.writer_gone``), else either: a
warning in each case, saying which. Kept apart from ``rules.py`` so
the run-directory contract (written by ``run_writer.write_status``) has one reader.
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
    if state == "running" and c.log.writer:
        return [_finding("run_in_progress", "warning",
                         f"The run is still going (step {step} when status.json was written)",
                         f"{c.log.writer} holds the run directory's lock: this report "
                         "shows the steps logged so far, not a finished run.",
                         "again when it ends, or follow it live with `finitetune watch`.")]
    if state == "running" and not c.log.writer_gone:
        return [_finding("run_unfinished", "warning",
                         f"The run did not finish: status.json says running (step {step})",
                         "Either it is still training where it was started, or its process was "
                         "killed: this machine cannot tell (no run lock here, or one taken on "
                         "another host).",
                         "whether the process is alive; `finitetune train --resume` continues "
                         "it from its last healthy checkpoint.")]
    if state == "running":
        return [_finding("run_unfinished", "warning",
                         f"The run did not finish: its process ended at or after step {step} "
                         "without recording an outcome",
                         "status.json still says running and no process holds the run "
                         "directory's lock: the process was killed (SIGKILL, the OOM killer, "
                         "a lost node) before it could write why it stopped.",
                         "the job's scheduler or system log for why it was killed; "
                         "`finitetune train --resume` continues it from its last "
                         "healthy checkpoint.")]
    return []


def _finding(rule: str, severity: str, title: str, detail: str, check: str) -> dict[str, Any]:
    return {"rule": rule, "severity": severity, "title": title, "detail": detail,
            "check": check, "steps": []}

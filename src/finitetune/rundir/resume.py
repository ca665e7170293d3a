"""Resume a run that was killed at any moment: pick the checkpoint, set the rest aside, repair.

``finitetune train --resume`` and ``Trainer.train(resume_from_checkpoint=True)`` (with
:class:`~finitetune.integrations.hf.checkpoint_callback.CheckpointCallback`) both come here:

1. the newest *healthy* checkpoint is chosen (:func:`finitetune.rundir.checkpoints.select_checkpoint`);
   newer ones that are half-written or hold NaN/inf are renamed out of the Trainer's sight and
   named, with the reason, on the console and in the resume event;
2. ``metrics.jsonl`` and ``events.jsonl`` are repaired (a torn last line is dropped and
   reported) and cut back to that checkpoint's step: the resumed run logs the later steps
   again, so every step and event is in the files exactly once;
3. one ``resume`` event records all of it (it survives later resumes from the same or a later
   checkpoint, so ``finitetune explain`` and the report show the run's restarts).

With no healthy checkpoint at all the run starts again from step 0 (logs emptied the same
way), which is what a run killed before its first save needs. Rank 0 alone touches the files.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finitetune.rundir import files as run_files
from finitetune.rundir.checkpoints import CheckpointHealth, select_checkpoint, set_aside
from finitetune.rundir.jsonio import append_jsonl

log = logging.getLogger("finitetune")

__all__ = ["ResumePlan", "prepare_resume", "record_event"]


@dataclass
class ResumePlan:
    """What :func:`prepare_resume` decided and did."""

    checkpoint: CheckpointHealth | None
    """The checkpoint to resume from; None: start again from step 0."""
    rejected: list[CheckpointHealth] = field(default_factory=list)
    """Newer checkpoints that were not usable, newest first."""
    moved: list[str] = field(default_factory=list)
    """Where each rejected checkpoint was renamed to (same order)."""
    repaired: list[str] = field(default_factory=list)
    """One note per torn or bad line removed from the run's JSON-lines files."""
    abandoned: dict[str, list[int]] = field(default_factory=dict)
    """Events after the checkpoint, removed from ``events.jsonl`` (the resumed run logs its own
    steps again): action -> steps, kept here so the history of the run stays visible."""

    @property
    def step(self) -> int:
        return self.checkpoint.step if self.checkpoint is not None else 0

    @property
    def path(self) -> str | None:
        return str(self.checkpoint.path) if self.checkpoint is not None else None

    def message(self) -> str:
        where = (f"{self.checkpoint.name} (step {self.step})" if self.checkpoint is not None
                 else "step 0 (no healthy checkpoint)")
        text = f"resuming from {where}"
        for h, moved in zip(self.rejected, self.moved, strict=False):
            text += f"; skipped {h.name}: {h.health.value}, {h.reason} (moved to {moved})"
        if self.abandoned:
            text += "; before the restart: " + ", ".join(
                f"{len(steps)} {action} (step{'s' if len(steps) > 1 else ''} "
                f"{', '.join(map(str, steps[:6]))}{', ...' if len(steps) > 6 else ''})"
                for action, steps in self.abandoned.items())
        return text


def prepare_resume(run_dir: str | os.PathLike, *, trim: bool = True, write: bool = True,
                   require: bool = False,
                   changes: dict[str, tuple[Any, Any]] | None = None) -> ResumePlan:
    """Choose the checkpoint, set unusable ones aside, repair and trim the logs, record it.

    ``write=False``: only choose. ``trim=False``: leave the JSON-lines files as they are (a
    directory without finitetune's metrics writer). ``require``: without a healthy checkpoint
    change nothing (the caller reports the error) instead of preparing a restart from step 0.
    ``changes``: the settings this resume changed (``{name: (old, new)}``), for its event.
    """
    run_dir = Path(run_dir)
    chosen, rejected = select_checkpoint(run_dir)
    plan = ResumePlan(chosen, rejected)
    if not write or (require and chosen is None):
        return plan
    plan.moved = [set_aside(h).name for h in rejected]
    if trim:
        plan.abandoned = _after(run_dir / run_files.EVENTS, plan.step)
        for name in (run_files.METRICS, run_files.EVENTS):
            plan.repaired += run_files.trim_jsonl(run_dir / name, plan.step).notes
    for note in plan.repaired:
        log.warning("finitetune: resume: %s", note)
    message = plan.message()
    if changes:
        message += "; settings changed: " + ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
    record_event(run_dir, {
        "step": plan.step, "kind": "resume", "action": "resume",
        "checkpoint": chosen.name if chosen is not None else None,
        "skipped": [{"checkpoint": h.name, "health": h.health.value, "reason": h.reason,
                     "moved_to": m} for h, m in zip(rejected, plan.moved, strict=False)],
        "repaired": plan.repaired, "abandoned": plan.abandoned, "message": message,
        **({"settings_changed": {k: [old, new] for k, (old, new) in changes.items()}}
           if changes else {}),
    })
    return plan


def _after(events: Path, step: int) -> dict[str, list[int]]:
    """action -> steps of the events after ``step`` (tolerant read: trimming repairs later)."""
    out: dict[str, list[int]] = {}
    for e in run_files.read_jsonl(events, run_files.Tolerance.TOLERANT).records:
        s = e.get("step")
        if isinstance(s, int) and s > step:
            out.setdefault(str(e.get("action") or e.get("kind") or "event"), []).append(s)
    return out


def record_event(run_dir: str | os.PathLike | None, record: dict[str, Any], *,
                 warn: bool = True) -> None:
    """Append a run event (checkpoint refused, resume, on-disk rollback) to ``events.jsonl``
    and log its message; rank 0 only (callers decide)."""
    record = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
              **record}
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        append_jsonl(Path(run_dir) / run_files.EVENTS, record)
    (log.warning if warn else log.info)("finitetune: %s", record.get("message", record))

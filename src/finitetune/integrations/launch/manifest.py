"""The manifest of a ``finitetune run``: which Trainers ran, where their files are, how it ended.

One strict-JSON line per event, appended by rank 0 of each Trainer of the program
(:class:`~finitetune.integrations.launch.callbacks.RunRecorder` calls :func:`begin_record` and
:func:`end_record`) and read back by the CLI (:func:`read_manifest`) once the program has
exited, to print each run's health report and choose the exit code. Pure Python: the CLI reads
it without importing torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finitetune.parsing.nesting import json_loads
from finitetune.rundir.jsonio import append_jsonl

__all__ = ["TrainerRun", "begin_record", "end_record", "read_manifest", "refused_record"]


def begin_record(manifest: str | os.PathLike, events_dir: Path, output_dir: str,
                 start_step: int) -> None:
    """A Trainer started ``train()``: where its files go."""
    append_jsonl(manifest, {"event": "begin", "events_dir": str(events_dir),
                            "output_dir": output_dir, "pid": os.getpid(),
                            "start_step": start_step})


def end_record(manifest: str | os.PathLike, events_dir: Path, *, global_step: int,
               halted: bool, counters: dict[str, Any] | None, injected: list[str],
               rank_checksums: list[float | None]) -> None:
    """That Trainer's ``train()`` ended (normally or halted by the guard)."""
    append_jsonl(manifest, {"event": "end", "events_dir": str(events_dir),
                            "global_step": global_step, "halted": halted, "counters": counters,
                            "injected": injected, "rank_checksums": rank_checksums})


def refused_record(manifest: str | os.PathLike, output_dir: str, error: str, *, who: str,
                   trainer: str | None = None) -> None:
    """A Trainer was stopped when it was built, before it wrote anything: by the guard
    (``who="guard"``: a release or set-up it cannot stand on) or because another process holds
    its directory (``who="lock"``)."""
    append_jsonl(manifest, {"event": "refused", "events_dir": output_dir,
                            "output_dir": output_dir, "pid": os.getpid(), "error": error,
                            "who": who, "trainer": trainer})


@dataclass
class TrainerRun:
    """One Trainer's ``train()`` as the manifest tells it."""

    events_dir: str
    output_dir: str | None = None
    finished: bool = False
    halted: bool = False
    global_step: int | None = None
    counters: dict[str, Any] = field(default_factory=dict)
    injected: list[str] = field(default_factory=list)
    rank_checksums: list[float | None] = field(default_factory=list)
    refused: str | None = None
    """Why the Trainer was stopped when it was built (see :func:`refused_record`), else None."""
    refused_by: str | None = None
    """``guard`` (its seam checks) or ``lock`` (another process holds the directory)."""
    trainer: str | None = None


def read_manifest(path: str | os.PathLike) -> list[TrainerRun]:
    """The runs in ``path`` in start order (a begin without an end: the program died)."""
    runs: list[TrainerRun] = []
    p = Path(path)
    if not p.is_file():
        return runs
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json_loads(line, str(p))
        except ValueError:
            continue  # a line torn by a killed process
        if rec.get("event") == "begin":
            runs.append(TrainerRun(rec["events_dir"], rec.get("output_dir")))
            continue
        if rec.get("event") == "refused":
            runs.append(TrainerRun(rec["events_dir"], rec.get("output_dir"),
                                   refused=str(rec.get("error") or "refused"),
                                   refused_by=rec.get("who"), trainer=rec.get("trainer")))
            continue
        run = next((r for r in reversed(runs)
                    if r.events_dir == rec.get("events_dir") and not r.finished), None)
        if run is None:
            continue
        run.finished, run.halted = True, bool(rec.get("halted"))
        run.global_step = rec.get("global_step")
        run.counters = rec.get("counters") or {}
        run.injected = rec.get("injected") or []
        run.rank_checksums = rec.get("rank_checksums") or []
    return runs

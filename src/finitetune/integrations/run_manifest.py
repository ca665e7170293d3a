"""The manifest of a ``finitetune run``: which Trainers ran, where their files are, how it ended.

One strict-JSON line per event, appended by rank 0 of each guarded Trainer
(:class:`RunRecorder`) and read back by the CLI (:func:`read_manifest`) once the program has
exited, to print each run's health report and choose the exit code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finitetune.jsonio import append_jsonl

__all__ = ["RunRecorder", "TrainerRun", "read_manifest"]


class RunRecorder(TrainerCallback):
    """Appends ``begin`` and ``end`` records of a Trainer's ``train()`` to the manifest."""

    def __init__(self, manifest: str | os.PathLike, events_dir: Path, guard_cb: Any = None,
                 injector: Any = None) -> None:
        self.manifest, self.events_dir = manifest, Path(events_dir)
        self.guard_cb, self.injector = guard_cb, injector

    def _write(self, state: Any, record: dict[str, Any]) -> None:
        if state.is_world_process_zero:
            append_jsonl(self.manifest, {"events_dir": str(self.events_dir), **record})

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.events_dir.mkdir(parents=True, exist_ok=True)
        self._write(state, {"event": "begin", "output_dir": str(args.output_dir),
                            "pid": os.getpid(), "start_step": state.global_step})

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None,
                     **kwargs: Any) -> None:
        from finitetune import distributed
        from finitetune.guard.policy import Action

        guard = self.guard_cb.guard if self.guard_cb is not None else None
        last = guard.last_outcome if guard is not None else None
        injected = [f"{k}@{s}" for k, s in self.injector.fired] if self.injector else []
        # COLLECTIVE (distributed, once per train()): every rank's parameter checksum and
        # injected faults, so the summary can say whether all ranks ended on the same weights
        per_rank = distributed.all_gather_objects((_checksum(model), injected))
        self._write(state, {
            "event": "end", "global_step": state.global_step,
            "halted": bool(last is not None and last.action == Action.HALT),
            "counters": dict(guard.counters) if guard is not None else None,
            "injected": sorted({f for _, fired in per_rank for f in fired}),
            "rank_checksums": [c for c, _ in per_rank]})


def _checksum(model: Any) -> float | None:
    """Sum of every parameter in float64 (NaN if any is non-finite); None for sharded ones."""
    import torch

    params = list(model.parameters()) if model is not None else []
    if not params or any(hasattr(p, "to_local") for p in params):
        return None
    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in params)
    return float(total)  # HOST SYNC, once per train()


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


def read_manifest(path: str | os.PathLike) -> list[TrainerRun]:
    """The runs in ``path`` in start order (a begin without an end: the program died)."""
    runs: list[TrainerRun] = []
    p = Path(path)
    if not p.is_file():
        return runs
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a killed process
        if rec.get("event") == "begin":
            runs.append(TrainerRun(rec["events_dir"], rec.get("output_dir")))
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

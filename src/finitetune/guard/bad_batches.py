"""Bad batches remembered: the samples of every step skipped or rolled back for a fault.

PaLM and OPT recovered from loss spikes by restarting earlier and *skipping the batches* that
caused them; Megatron and Lightning keep a list of iterations to skip on resume. Here the guard
does it: each step not applied because of a fault (non-finite gradient or loss, norm overflow,
a spike acted on) appends one line to ``bad_samples.jsonl`` in the run directory with the
dataset indices of its samples and where they came from (``file:line``). The file is never
trimmed on resume, so a run resumed or restarted from a checkpoint before that step, or one
that reaches those samples again in a later epoch, leaves them out.

What is left out (``GuardConfig.skip_bad_samples``):

- ``culprits`` (default): the samples attribution's replay found non-finite on their own;
  every sample of the step when it names none (no attribution, a spike, a transient fault);
- ``step``: every sample of the faulty step;
- ``window``: the step's samples and those of ``bad_sample_window`` optimizer steps before and
  after it in data order (recorded at fault time; PaLM skipped a few hundred batches around a
  spike);
- ``off``: remember, skip nothing.

A fault while the trainable weights or optimizer state are already NaN/inf is the state's, not
the data's: such steps are recorded (``cause: nonfinite_state``) but their samples are not
skipped (an inf weight would otherwise get every later batch blamed).

Skipping happens in the collator (:class:`SkipSamples`): remembered rows are dropped from their
micro-batch before padding, so data order and positions are unchanged and a resume stays
aligned with the Trainer's own data skipping. A micro-batch left with no row becomes a single
fully masked padding row (0 supervised tokens: it adds nothing; a step whose every micro-batch
is empty is skipped as ``no_valid_tokens``, which counts toward ``max_consecutive_skips``).

Pure Python + torch; every rank records its own micro-batches and rank 0 writes (the fault path
gathers them: COLLECTIVE, taken by every rank because the guard's decision is global).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from finitetune import distributed
from finitetune.data.fingerprint import RowFingerprints
from finitetune.guard.policy import Reason
from finitetune.guard.sample_remap import Remap, remap
from finitetune.rundir import files as run_files
from finitetune.rundir.jsonio import append_jsonl

__all__ = ["BadSampleMemory", "BadSampleRecorder", "SkipSamples"]

log = logging.getLogger("finitetune")

_NOT_FAULTS = frozenset({Reason.NO_VALID_TOKENS, Reason.SCALER_OVERFLOW})
"""Not-applied steps that say nothing about the data: empty windows, fp16 calibration."""


class BadSampleMemory:
    """``bad_samples.jsonl`` of a run directory: read at start, appended on faults.

    Args:
        run_dir: the run directory (``None``: remember in memory only).
        mode: ``off``, ``culprits``, ``step`` or ``window`` (see the module docstring).
        window: optimizer steps before and after a faulty one whose samples ``window`` mode
            also records and skips.
        accumulation: micro-batches per optimizer step (to size the window).
        sources: dataset index -> ``file:line`` (mapping, sequence or callable).
        fingerprints: the content fingerprints of the training rows and of the data: recorded
            with each sample, and used to find remembered samples again in data that changed
            (:mod:`~finitetune.guard.sample_remap`).
    """

    def __init__(self, run_dir: str | os.PathLike | None, *, mode: str = "culprits",
                 window: int = 0, accumulation: int = 1,
                 sources: Mapping[int, str | None] | Sequence[str] | Callable | None = None,
                 fingerprints: RowFingerprints | None = None) -> None:
        self.path = Path(run_dir) / run_files.BAD_SAMPLES if run_dir is not None else None
        self.mode = str(getattr(mode, "value", mode))
        self.window_batches = max(0, int(window)) * max(1, int(accumulation))
        self.sources = sources
        self.fingerprints = fingerprints
        self.entries = self._load()
        self.remapped = self._remap()
        """What was found again (or not) in changed data, said at start-up."""
        self.skip: set[int] = self.skip_ids()
        """The sample ids left out now (shared with :class:`SkipSamples`, updated live)."""
        self.collators: list[SkipSamples] = []
        self._pending: list[dict[str, Any]] = []

    def _load(self) -> list[dict[str, Any]]:
        if self.path is None or not self.path.is_file():
            return []
        # a torn last line (killed mid-write) is dropped and the file repaired, on rank 0 only
        tolerance = (run_files.Tolerance.REPAIR if distributed.is_main_process()
                     else run_files.Tolerance.TOLERANT)
        return run_files.read_jsonl(self.path, tolerance).records

    def _remap(self) -> Remap | None:
        """Entries recorded on other data, translated to today's rows by content; the console
        says what moved and what was not found, and (rank 0) ``bad_samples.jsonl`` records it."""
        if self.fingerprints is None or not self.entries:
            return None
        found = remap(self.entries, self.fingerprints, self.source)
        message = found.message()
        if message:
            log.warning("finitetune: %s", message)
        line = found.record(self.fingerprints.data)
        if line is not None and self.path is not None and distributed.is_main_process():
            append_jsonl(self.path, {"time": _now(), **line})
        return found

    def skip_ids(self) -> set[int]:
        """The sample ids the current mode leaves out, from every remembered entry (in today's
        indices when the data changed)."""
        out: set[int] = set()
        if self.mode == "off":
            return out
        current = self.remapped.entries if self.remapped is not None else self.entries
        for e in [*current, *self.entries[len(current):]]:
            if e.get("kind") == "remap":
                continue
            if e.get("cause") == "nonfinite_state":
                continue  # the weights were already NaN/inf: the data is not to blame
            if e.get("kind") == "window":
                if self.mode == "window":
                    out.update(_ints(e.get("sample_ids")))
                continue
            ids = _ints(e.get("culprits")) if self.mode == "culprits" else []
            out.update(ids or _ints(e.get("sample_ids")))
        return out

    def source(self, sample_id: int) -> str | None:
        s = self.sources
        try:
            return (s(sample_id) if callable(s) else s.get(sample_id) if isinstance(s, Mapping)
                    else s[sample_id] if s is not None else None)
        except (IndexError, KeyError, TypeError):
            return None

    def wrap(self, collator: Any) -> SkipSamples:
        """The collator that leaves the remembered samples out (and logs what it batches)."""
        wrapped = SkipSamples(collator, self.skip, log_len=2 * self.window_batches + 8)
        wrapped.on_batch = self._feed_pending
        self.collators.append(wrapped)
        return wrapped

    # ---- recording ---------------------------------------------------------------------------
    def record(self, outcome: Any, step_ids: list[list[int]],
               culprits: list[int] | None = None, *,
               state_bad: list[str] | None = None) -> dict[str, Any] | None:
        """Remember the samples of a faulty step (every rank calls this; rank 0 writes).

        ``state_bad``: non-finite weights/optimizer tensors found at that step: the samples
        are then recorded as innocent (``cause: nonfinite_state``) and never skipped, since any
        batch would have failed on that state.

        COLLECTIVE when distributed (fault path only): the ranks' sample ids are gathered.
        Returns the entry written (rank 0) or None.
        """
        reason = getattr(outcome.reason, "value", outcome.reason)
        local = {"ids": [i for mb in step_ids for i in mb], "culprits": list(culprits or []),
                 "before": self._neighbours(step_ids, before=True)}
        parts = (distributed.all_gather_objects(local) if distributed.is_distributed()
                 else [local])
        ids = [i for p in parts for i in p["ids"]]
        entry = {
            "time": _now(), "step": outcome.step, "reason": reason,
            "action": getattr(outcome.action, "value", outcome.action),
            "sample_ids": ids, "sources": [self.source(i) for i in ids], **self._content(ids),
        }
        found = [i for p in parts for i in p["culprits"]]
        if found:
            entry["culprits"] = found
        if state_bad:
            entry.update(cause="nonfinite_state", nonfinite_state=state_bad[:5])
        self._remember(entry)
        if self.mode == "window" and self.window_batches and not state_bad:
            before = [i for p in parts for i in p["before"]]
            self._remember(self._window_entry(outcome.step, before, "before"))
            self._pending.append({"step": outcome.step, "left": self.window_batches,
                                  "ids": self._neighbours(step_ids, before=False)})
        return entry if distributed.is_main_process() else None

    def _window_entry(self, step: int, ids: list[int], side: str) -> dict[str, Any]:
        return {"step": step, "kind": "window", "side": side, "sample_ids": ids,
                "sources": [self.source(i) for i in ids], **self._content(ids)}

    def _content(self, ids: list[int]) -> dict[str, Any]:
        """``data`` and ``fingerprints`` of an entry: what its samples hold, so a resume on
        changed data finds them (empty without fingerprints)."""
        fp = self.fingerprints
        if fp is None:
            return {}
        return {"data": fp.data, "fingerprints": [fp.rows.get(i) for i in ids]}

    def _remember(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        new = self.skip_ids()
        self.skip.clear()
        self.skip.update(new)  # the collators hold this very set
        if self.path is not None and distributed.is_main_process():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.path, entry)

    def _neighbours(self, step_ids: list[list[int]], *, before: bool) -> list[int]:
        """Ids of up to ``window_batches`` logged micro-batches before (or already after) the
        faulty step's ones, in data order (the collators' logs)."""
        if not self.window_batches or not self.collators:
            return []
        log = list(self.collators[-1].log)
        seqs = [s for s, ids in log if ids in step_ids]
        if not seqs:
            return []
        lo, hi = min(seqs), max(seqs)
        pick = [ids for s, ids in log if (lo - self.window_batches <= s < lo if before
                                          else hi < s <= hi + self.window_batches)]
        return [i for ids in pick for i in ids]

    def _feed_pending(self, ids: list[int]) -> None:
        for p in self._pending:
            if p["left"] > 0:
                p["ids"].extend(ids)
                p["left"] -= 1

    def flush(self) -> None:
        """Write the after-windows collected since the faults (called at saves and at the end of
        training; COLLECTIVE when distributed: every rank calls it at the same point)."""
        mine = [(p["step"], p["ids"]) for p in self._pending]
        parts = (distributed.all_gather_objects(mine) if distributed.is_distributed()
                 else [mine])
        for p in self._pending:
            p["ids"] = []  # written now; keep collecting the rest of an unfinished window
        self._pending = [p for p in self._pending if p["left"] > 0]
        steps: dict[int, list[int]] = {}
        for part in parts:
            for step, ids in part:
                steps.setdefault(step, []).extend(ids)
        for step, ids in sorted(steps.items()):
            if ids:
                self._remember(self._window_entry(step, ids, "after"))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values or [] if isinstance(v, (int, float)) and not
            isinstance(v, bool)]


class SkipSamples:
    """Collator wrapper: drops rows whose ``index`` is in ``skip``, then collates the rest.

    Keeps a short log of (sequence number, indices) of the micro-batches it made, for the
    window mode. ``dropped`` counts the rows left out.
    """

    def __init__(self, collator: Any, skip: set[int], *, log_len: int = 8) -> None:
        self.collator = collator
        self.skip = skip
        self.dropped = 0
        self.log: deque[tuple[int, list[int]]] = deque(maxlen=max(1, log_len))
        self.on_batch: Callable[[list[int]], None] | None = None
        self._seq = 0

    def __getattr__(self, name: str) -> Any:  # pad_token_id etc. of the wrapped collator
        return getattr(self.__dict__["collator"], name)

    def __call__(self, rows: list[dict[str, Any]]) -> Any:
        kept = [r for r in rows if r.get("index") not in self.skip] if self.skip else rows
        self.dropped += len(rows) - len(kept)
        if not kept:
            kept = [self._empty_row(rows[0])]
        ids = [int(r["index"]) for r in kept if r.get("index") is not None
               and int(r["index"]) >= 0]
        self.log.append((self._seq, ids))
        self._seq += 1
        if self.on_batch is not None:
            self.on_batch(ids)
        return self.collator(kept)

    def _empty_row(self, like: dict[str, Any]) -> dict[str, Any]:
        """One padding token, label masked: a micro-batch that teaches nothing."""
        pad = getattr(self.collator, "pad_token_id", None)
        token = pad if pad is not None else like["input_ids"][0]
        return {"input_ids": [token], "labels": [-100], "index": -1}


class BadSampleRecorder:
    """The guard's ``on_fault``: runs ``inner`` (attribution) first, then remembers the step's
    samples. Returns ``inner``'s record, or the sample ids when there is no inner hook."""

    def __init__(self, memory: BadSampleMemory, inner: Callable | None = None) -> None:
        self.memory = memory
        self.inner = inner
        self.guard: Any = None

    def bind_guard(self, guard: Any) -> None:
        self.guard = guard
        bind = getattr(self.inner, "bind_guard", None)
        if callable(bind):
            bind(guard)

    def __call__(self, outcome: Any) -> dict[str, Any] | None:
        rec = self.inner(outcome) if self.inner is not None else None
        step_ids = [[int(i) for i in ids.tolist() if int(i) >= 0] if ids is not None else []
                    for _, ids in getattr(self.guard, "batches", None) or []]  # HOST SYNC
        if outcome.reason in _NOT_FAULTS:
            if step_ids and not any(step_ids) and self.memory.skip:
                rec = {**(rec or {}), "note": "every sample of this step is remembered as bad "
                                              f"({run_files.BAD_SAMPLES}) and was left out"}
            return rec
        culprits = [int(b["index"]) for b in (rec or {}).get("bad_samples") or []
                    if isinstance(b.get("index"), int)]
        state_bad = self._state_nonfinite()
        entry = self.memory.record(outcome, step_ids, culprits, state_bad=state_bad)
        if rec is None and entry is not None:
            rec = {"sample_ids": entry["sample_ids"], "sources": entry["sources"]}
        return rec

    def _state_nonfinite(self) -> list[str]:
        """Non-finite trainable weights or optimizer state: then the state, not the data, is
        to blame (fault path only; COLLECTIVE when distributed, as every rank is here)."""
        from finitetune.guard.state_check import check_state

        model = getattr(self.guard, "model", None)
        if model is None:
            return []
        return check_state(model, getattr(self.guard, "inner_optimizer", None)).nonfinite

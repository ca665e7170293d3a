"""Follow a growing log: read only what was appended since the last look (``finitetune watch``).

The cost of a poll follows the new bytes, not the file: each followed file keeps its offset
and the unfinished tail of its last line. A file that shrinks was truncated (read again from
its start); a path whose inode changed was rotated (the old file is read to its end, then the
new one from its start). Sources: a finitetune run directory (``metrics.jsonl``,
``events.jsonl``, ``eval.json``), a Trainer output folder (LLaMA-Factory's
``trainer_log.jsonl``, TensorBoard events, else ``trainer_state.json`` re-read when it
changes), a TensorBoard folder, or one log file (JSON lines or console text). Records go into
one :class:`~finitetune.report.records.ParsedLog` that grows in place.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from finitetune.errors import NestingError, ReportInputError
from finitetune.parsing.nesting import json_loads
from finitetune.report.console import KeyValueScanner, scan_dicts
from finitetune.report.records import Collector, ParsedLog, feed_by_step
from finitetune.report.tensorboard import EventReader, event_dirs
from finitetune.rundir import files as run_files
from finitetune.rundir.jsonio import decode_nonfinite

__all__ = ["Follower", "TailFile"]


class TailFile:
    """New complete lines of one file, across truncation and rotation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = None
        self._inode: int | None = None
        self._partial = b""
        self.notes: list[str] = []
        self.bytes_read = 0
        """Bytes read so far: a poll's cost follows the new bytes, not the file."""

    def read_lines(self) -> list[bytes]:
        """Lines completed since the last call (without their ``\\n``)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._drain() if self._fh else []
        data = b""
        if self._fh is not None and st.st_ino != self._inode:  # rotated: finish the old file
            data = self._fh.read()
            self._close("rotated (a new file took its name)")
        if self._fh is None:
            self._fh, self._inode = open(self.path, "rb"), st.st_ino  # noqa: SIM115
        elif st.st_size < self._fh.tell():  # truncated in place: start again
            self._fh.seek(0)
            self._partial = b""
            self.notes.append(f"{self.path.name}: truncated; reading it again from its start")
        data += self._fh.read()
        return self._split(data)

    def _drain(self) -> list[bytes]:
        data = self._fh.read()
        self._close("removed")
        return self._split(data)

    def _close(self, why: str) -> None:
        self._fh.close()
        self._fh, self._inode = None, None
        self.notes.append(f"{self.path.name}: {why}; following the new one")

    def _split(self, data: bytes) -> list[bytes]:
        self.bytes_read += len(data)
        if not data:
            return []
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        return lines

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class Follower:
    """Everything :mod:`finitetune.report.load` reads, read again as it grows.

    :meth:`poll` returns how many entries and events arrived and whether any of them is
    alarming (a non-finite or zero loss or norm, an event), so that ``watch`` can judge at once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.log = ParsedLog(str(path), "watch")
        self.col = Collector()
        self.col.records, self.col.evals = self.log.records, self.log.evals
        self.col.summary, self.col.events = self.log.summary, self.log.events
        self._tails: dict[str, TailFile] = {}
        self._mode: str | None = None
        self._kv = KeyValueScanner(self.col)
        self._dicts_seen = False
        self._tb: EventReader | None = None
        self._mtimes: dict[Path, float] = {}

    # -------------------------------------------------------------------------- polling --
    def poll(self) -> tuple[int, bool]:
        """Read what is new; returns (entries + events added, whether any is alarming)."""
        before = (len(self.log.records), len(self.log.evals), len(self.log.events))
        if self._mode is None:
            self._mode = self._detect()
        if self._mode == "run_dir":
            self._poll_run_dir()
        elif self._mode == "tensorboard":
            self._poll_tensorboard()
        elif self._mode == "state":
            self._poll_state()
        elif self._mode is not None:
            self._poll_file(self._file(), self._mode)
        for tail in self._tails.values():
            self.log.notes += tail.notes
            tail.notes = []
        new_records = self.log.records[before[0]:]
        new_evals = self.log.evals[before[1]:]
        added = (len(new_records) + len(new_evals) + len(self.log.events) - before[2])
        alarm = len(self.log.events) > before[2] or any(_alarming(r) for r in new_records) or any(
            not _finite(r.get("eval_loss")) for r in new_evals if "eval_loss" in r)
        return added, alarm

    def _detect(self) -> str | None:
        """How to follow ``path``; None while it does not exist or holds nothing known yet."""
        p = self.path
        if p.is_dir():
            if run_files.is_run_dir(p):
                return "run_dir"
            if (p / "trainer_log.jsonl").is_file():
                return "jsonl"
            if event_dirs(p):
                return "tensorboard"
            if (p / run_files.TRAINER_STATE).is_file() or run_files.checkpoints(p):
                return "state"
            return None
        if not p.is_file():
            return None
        if p.name.startswith("events.out.tfevents."):
            return "tensorboard"
        with open(p, "rb") as fh:
            head = fh.read(4096).lstrip()
        if not head:
            return None
        if head.startswith(b"{") and b"\n" in head:
            first = head.split(b"\n", 1)[0]
            try:
                obj = json_loads(first, str(p))
            except ValueError:
                return "state" if p.suffix == ".json" else "console"
            return "state" if isinstance(obj, dict) and "log_history" in obj else "jsonl"
        return "state" if p.suffix == ".json" else "console"

    def _file(self) -> Path:
        return self.path / "trainer_log.jsonl" if self.path.is_dir() else self.path

    def _tail(self, path: Path) -> TailFile:
        tail = self._tails.get(str(path))
        if tail is None:
            tail = self._tails[str(path)] = TailFile(path)
        return tail

    def _poll_file(self, path: Path, mode: str) -> None:
        lines = self._tail(path).read_lines()
        if not lines:
            return
        if mode == "jsonl":
            for line in lines:
                entry = _json_object(line, self.log.notes, str(path))
                if entry is not None:
                    self.col.add(entry)
            return
        before = len(self.log.records) + len(self.log.evals)
        scan_dicts(iter([b"\n".join(lines)]), self.col)
        self._dicts_seen |= len(self.log.records) + len(self.log.evals) > before
        if not self._dicts_seen:  # no printed dicts: key: value dialects, line by line
            for line in lines:
                self._kv.feed(line.decode("utf-8", "replace"))

    def _poll_run_dir(self) -> None:
        for line in self._tail(self.path / run_files.METRICS).read_lines():
            entry = _json_object(line, self.log.notes, run_files.METRICS)
            if entry is not None:
                self.col.add(entry)
        for line in self._tail(self.path / run_files.EVENTS).read_lines():
            event = _json_object(line, self.log.notes, run_files.EVENTS)
            if event is not None:
                self.log.events.append(decode_nonfinite(event))
        eval_path = self.path / run_files.EVAL
        if self._changed(eval_path):
            try:
                data = json_loads(eval_path.read_text(encoding="utf-8"), str(eval_path))
            except (OSError, ValueError):
                return  # being written: read it next time
            self.log.eval = decode_nonfinite(data) if isinstance(data, dict) else None

    def _poll_tensorboard(self) -> None:
        if self._tb is None:
            dirs = event_dirs(self.path) if self.path.is_dir() else [self.path]
            if not dirs:
                return
            self._tb = EventReader(dirs[-1])
        feed_by_step(self.col, self._tb.poll())

    def _poll_state(self) -> None:
        """trainer_state.json is rewritten whole at each save: read it again when it changes."""
        from finitetune.report.load import load_file

        state = self.path if self.path.is_file() else self.path / run_files.TRAINER_STATE
        newest = [*run_files.checkpoints(self.path)] if self.path.is_dir() else []
        candidates = [p for p in (state, *(c / run_files.TRAINER_STATE for c in newest))
                      if p.is_file()]
        if not candidates:
            return
        latest = max(candidates, key=lambda p: p.stat().st_mtime)
        if not self._changed(latest):
            return
        try:
            fresh = load_file(latest)
        except ReportInputError:
            return  # mid-write: read it next time
        self.log.records[:] = fresh.records
        self.log.evals[:] = fresh.evals
        self.log.summary.update(fresh.summary)

    def _changed(self, path: Path) -> bool:
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return False
        if self._mtimes.get(path) == mtime:
            return False
        self._mtimes[path] = mtime
        return True

    def ended(self) -> bool:
        """A finitetune run directory says it ended: its final report was written, or the
        process writing it is gone without writing one (killed: :func:`~finitetune.rundir.files.
        writer_gone`). In that case ``log.status`` is read, so that the last analysis says the
        run did not finish."""
        if self._mode != "run_dir":
            return False
        if (self.path / run_files.REPORT_JSON).is_file():
            return True
        if not run_files.writer_gone(self.path):
            return False  # still being written, or that cannot be known from here: wait
        self.log.status = run_files.status_record(self.path) or {"state": "running"}
        return True

    def close(self) -> None:
        for tail in self._tails.values():
            tail.close()


def _json_object(line: bytes, notes: list[str] | None = None,
                 where: str = "a followed line") -> dict[str, Any] | None:
    try:
        obj = json_loads(line, where)
    except NestingError as exc:
        if notes is not None and len(notes) < 20:
            notes.append(f"skipped: {exc}")
        return None
    except ValueError:
        return None  # a torn line: the writer is still writing it, or it died
    return obj if isinstance(obj, dict) else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _alarming(rec: dict[str, float]) -> bool:
    """A new entry that could turn the verdict at once: non-finite, or exactly zero."""
    loss, grad = rec.get("loss"), rec.get("grad_norm")
    return any(v is not None and (not math.isfinite(v) or v == 0.0) for v in (loss, grad))

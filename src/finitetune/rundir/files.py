"""The run directory's format: its file names, and the one reader of its JSON-lines files.

Every module that writes or reads a run directory (the main job, the Trainer callbacks, the
report, ``explain``, ``verify``, resume) takes the names from here, so renaming a file or
changing how a torn line is treated is one change. What each file holds is in the README ("The
run directory") and ``docs/architecture.md``.

The JSON-lines reader has one tolerance parameter because the callers need different
contracts from the same bytes:

- ``STRICT`` (``finitetune explain``, ``verify``): a bad line is an error naming file and line;
  a user who edited or cut the file is told so instead of shown half a timeline.
- ``TOLERANT`` (the health report): a bad line becomes a note and reading goes on; the report
  of a run that died mid-write is the one that matters most.
- ``REPAIR`` (resume): like ``TOLERANT``, and the file is rewritten without the bad lines, so
  that lines appended by the resumed run follow a clean file (a torn last line would otherwise
  glue itself to the next record).

Pure Python: no torch, no transformers (the report and ``explain`` use it).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from finitetune.errors import NestingError, ReportInputError
from finitetune.parsing.nesting import MAX_NESTING, json_loads
from finitetune.rundir.jsonio import decode_nonfinite, file_kind, write_text_atomic

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a live run is then not detected
    fcntl = None  # type: ignore[assignment]

# ---------------------------------------------------------------------------- file names --
CONFIG = "config.yaml"
"""The resolved settings; ``finitetune train --config RUN/config.yaml`` repeats the run."""
METRICS = "metrics.jsonl"
"""One strict-JSON line per logged optimizer step."""
EVENTS = "events.jsonl"
"""One strict-JSON line per guard decision other than "apply"."""
EVAL = "eval.json"
"""Exact match and eval loss before and after training."""
LABEL_REPORT = "label_report.json"
"""Label validation of the training data."""
PRECISION = "precision.json"
"""The precision plan and its reasons."""
TOKENIZER_DIR = "tokenizer"
"""The tokenizer the run used (saved before training)."""
FAULTS_DIR = "faults"
"""``step_N.safetensors``: the micro-batches of a faulty step, for a replay."""
FINAL_DIR = "final"
"""The trained adapter or model: written only from a model that trained."""
CHECKPOINT_PREFIX = "checkpoint-"
"""The Trainer's checkpoint folders, ``checkpoint-<step>``."""
TRAINER_STATE = "trainer_state.json"
"""The Trainer's own state file (top level or inside a checkpoint)."""
REPORT_MD, REPORT_JSON, REPORT_HTML = "report.md", "report.json", "report.html"
"""The health report in its three forms."""
BAD_SAMPLES = "bad_samples.jsonl"
"""One line per optimizer step skipped or rolled back for a fault: its sample ids (and source
lines). Never trimmed on resume: a resumed or restarted run skips these samples."""
CHECKPOINT_MARKER = "finitetune_checkpoint.json"
"""Inside a ``checkpoint-<step>`` folder: written last, after finitetune checked the saved state
finite; records the file sizes, so a later truncation is noticed without reading the tensors."""
PARTIAL_PREFIX = "partial-"
"""``partial-checkpoint-<step>``: a checkpoint a crash left half-written, set aside on resume
(renamed, not deleted; the Trainer's rotation and resume no longer see it)."""
NONFINITE_PREFIX = "nonfinite-"
"""``nonfinite-checkpoint-<step>``: a checkpoint holding NaN/inf, set aside on resume."""

OWNER_MARKER = ".finitetune-run.json"
"""Written first into every directory finitetune creates (run directory, ``verify`` output):
who created it and when. Only a directory carrying it may be replaced (``--overwrite``) or
resumed (``--resume``); a folder without it is never written into or deleted."""
RUN_LOCK = ".finitetune-run.lock"
"""Locked (``flock``) by the process writing the run directory, for as long as it writes;
holds who that is. The lock, not the file, is what counts: the kernel drops it when the process
ends, however it ends, so a killed run never leaves the directory locked."""
STATUS = "status.json"
"""The run's state (:class:`RunState`), its last step and, when it failed, the error."""

RUN_MARKERS = (METRICS, EVENTS, EVAL, LABEL_REPORT, CONFIG)
"""Files any one of which makes a folder a finitetune run directory (for readers)."""


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds at least one of finitetune's own run files."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in RUN_MARKERS)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a ``checkpoint-<step>`` folder, None for any other name."""
    name = Path(path).name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    suffix = name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if suffix.isdigit() else None


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-<step>`` folders of a run directory, oldest first."""
    found = [(checkpoint_step(p), p) for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


class RunState(str, Enum):
    """``state`` in :data:`STATUS`."""

    RUNNING = "running"
    """Training started and has not ended (or the process was killed)."""
    COMPLETED = "completed"
    """Training and the final evaluation finished."""
    HALTED = "halted"
    """The guard stopped training (``NonFiniteHalt``); the error says why."""
    FAILED = "failed"
    """An error stopped the run after it started; the error names it."""


def status_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``run_dir``'s :data:`STATUS` as a dict (None: no file, or not a JSON object)."""
    try:
        path = Path(run_dir) / STATUS
        data = json_loads(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_status(run_dir: str | os.PathLike) -> RunState | None:
    """The ``state`` of ``run_dir``'s :data:`STATUS` (None: no file, or unreadable)."""
    try:
        return RunState((status_record(run_dir) or {})["state"])
    except (KeyError, ValueError, TypeError):
        return None


def _probe_lock(path: str | os.PathLike) -> tuple[bool, dict[str, Any]] | None:
    """(whether a process holds :data:`RUN_LOCK` now, the record of the last one that took
    it); None without a lock file, or without advisory locks on this system. A shared probe:
    two checks never block each other."""
    lock = Path(path) / RUN_LOCK
    if fcntl is None or file_kind(lock) != "regular file":
        return None
    try:
        with open(lock, encoding="utf-8") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                held = False
            except BlockingIOError:
                held = True
            try:
                record = json_loads(fh.read() or "{}", str(lock))
            except ValueError:  # being written by the process that just took it
                record = {}
    except OSError:
        return None
    return held, record if isinstance(record, dict) else {}


def lock_holder(path: str | os.PathLike) -> str | None:
    """Who is writing ``path`` now ("finitetune train, pid 4242 on node1, since ..."), or None
    when no process holds its :class:`~finitetune.rundir.paths.RunLock` (a finished or killed
    run included). Tells a run that is still going from one whose ``status.json`` says
    running because its process was killed before it could say anything else."""
    probe = _probe_lock(path)
    if probe is None or not probe[0]:
        return None
    who = probe[1]
    return (f"{who.get('command', 'a finitetune process')}, pid {who.get('pid', '?')} on "
            f"{who.get('host', '?')}, since {who.get('since', '?')}")


def writer_gone(path: str | os.PathLike) -> bool:
    """Whether the process that wrote ``path`` has certainly ended: its lock file is there,
    was taken on this machine, and nobody holds it. False when that cannot be known here: no
    lock file (a directory from a finitetune without run locks), a lock taken on another host
    (a run directory copied or mounted from where it trains: a lock does not travel), or no
    advisory locks on this system."""
    probe = _probe_lock(path)
    return probe is not None and not probe[0] and probe[1].get("host") == socket.gethostname()


# ------------------------------------------------------------------------- JSON lines --
class Tolerance(str, Enum):
    """How :func:`read_jsonl` treats a line that is not a JSON object."""

    STRICT = "strict"
    """Raise :class:`~finitetune.errors.ReportInputError` naming the file and line."""
    TOLERANT = "tolerant"
    """Skip it and add a note."""
    REPAIR = "repair"
    """Skip it, add a note, and rewrite the file without it."""


@dataclass
class JsonLines:
    """What :func:`read_jsonl` read."""

    records: list[dict[str, Any]] = field(default_factory=list)
    """The JSON objects, in file order (non-finite numbers decoded when asked)."""
    notes: list[str] = field(default_factory=list)
    """One sentence per line that was skipped (and, with ``REPAIR``, removed)."""
    lines: int = 0
    """Lines in the file, blank ones included."""
    line_numbers: list[int] = field(default_factory=list)
    """The 1-based line of each record, so a caller can name the line of a bad field."""


def read_jsonl(path: str | os.PathLike, tolerance: Tolerance | str = Tolerance.STRICT, *,
               decode: bool = False) -> JsonLines:
    """Read a run directory's JSON-lines file (a missing file reads as empty).

    A bad *last* line is what a writer killed mid-line leaves; it is described as torn. With
    ``decode``, finitetune's strict-JSON encoding of NaN/inf (``k: null, k_nonfinite: "nan"``)
    is turned back into floats.

    Raises:
        ReportInputError: ``STRICT`` and a bad line, or the file cannot be read as UTF-8.
    """
    tolerance = Tolerance(tolerance)
    path = Path(path)
    out = JsonLines()
    if not path.is_file():
        return out
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"cannot read {path}: {exc}") from exc
    lines = text.splitlines()
    out.lines = len(lines)
    last = max((i for i, ln in enumerate(lines, 1) if ln.strip()), default=0)
    kept: list[str] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        deep = None
        try:
            record = json_loads(line, f"{path}:{lineno}")
        except NestingError as exc:
            record, deep = None, exc
        except ValueError:
            record = None
        if isinstance(record, dict):
            out.records.append(decode_nonfinite(record) if decode else record)
            out.line_numbers.append(lineno)
            kept.append(line)
            continue
        torn = lineno == last and deep is None
        if tolerance == Tolerance.STRICT:
            if deep is not None:
                raise deep
            what = "the last line, cut off mid-write" if torn else "not a JSON object"
            raise ReportInputError(f"{path}:{lineno}: not valid JSON ({what}): "
                                   f"{line.strip()[:120]!r}; was the file cut or edited? "
                                   "`finitetune train --resume` repairs a torn last line")
        what = ("truncated last line (the writer stopped?)" if torn else
                f"nested deeper than {MAX_NESTING} levels" if deep is not None
                else "not a JSON object")
        action = "removed" if tolerance == Tolerance.REPAIR else "skipped"
        out.notes.append(f"{path.name}, line {lineno}: {what}, {action}")
    if tolerance == Tolerance.REPAIR and out.notes:
        write_text_atomic(path, "".join(ln + "\n" for ln in kept))
    return out


def trim_jsonl(path: str | os.PathLike, last_step: int) -> JsonLines:
    """Repair ``path`` and drop the records of steps after ``last_step`` (resume: the resumed
    run logs them again, so each step stays in the file exactly once). Returns what was kept;
    its notes say what was repaired."""
    path = Path(path)
    read = read_jsonl(path, Tolerance.REPAIR)
    keep = [r for r in read.records if _step(r) <= last_step]
    if len(keep) != len(read.records):
        from finitetune.rundir.jsonio import dumps_strict

        write_text_atomic(path, "".join(dumps_strict(r) + "\n" for r in keep))
        read.line_numbers = list(range(1, len(keep) + 1))
    read.records = keep
    return read


def _step(record: dict[str, Any]) -> int:
    step = record.get("step", 0)
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else 0

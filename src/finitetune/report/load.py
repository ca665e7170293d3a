"""Format detection and loading: any path, pasted text or log dicts -> :class:`ParsedLog`.

This is the report's second layer. It decides what a source is (a finitetune run directory, a
Trainer output folder, ``trainer_state.json`` whole or in fragments, JSON lines such as
LLaMA-Factory's ``trainer_log.jsonl``, console text, a TensorBoard event folder, an MLflow
``mlruns/`` store, a trackio database, W&B CSV exports) and hands it to the reader for that
format. Readers live beside it: :mod:`.console`, :mod:`.fragments`, :mod:`.run_reader`,
:mod:`.tensorboard`, :mod:`.trackers`; all of them produce records through
:class:`~finitetune.report.records.Collector`.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from finitetune.errors import NestingError, ReportInputError
from finitetune.parsing.nesting import json_loads
from finitetune.report import trackers
from finitetune.report.console import EXPECTED, parse_console
from finitetune.report.fragments import looks_like_json_members, salvage_json
from finitetune.report.records import Collector, ParsedLog, feed_by_step, from_records
from finitetune.report.tensorboard import EventReader, event_dirs
from finitetune.rundir import files as run_files

__all__ = ["LLAMA_FACTORY_LOG", "load", "load_dir", "load_file", "parse_jsonl", "parse_text"]

LLAMA_FACTORY_LOG = "trainer_log.jsonl"
"""LLaMA-Factory's per-log-call JSON lines (``current_steps``, ``loss``, ``lr``...)."""


def load(source: str | os.PathLike | Iterable[Mapping[str, Any]] | ParsedLog) -> ParsedLog:
    """Detect the format of ``source`` and parse it; raise ReportInputError if it is none.

    ``source``: a path, ``"-"`` for stdin, pasted log text (a string with a newline; no path
    has one), or in-memory log dicts such as ``trainer.state.log_history``.
    """
    if isinstance(source, ParsedLog):
        return source
    if not isinstance(source, (str, os.PathLike)):
        return from_records(source)
    if isinstance(source, str) and "\n" in source:
        return parse_text(source)
    if str(source) == "-":
        return parse_text(sys.stdin.buffer.read().decode("utf-8", "replace"), "<stdin>")
    path = Path(source)
    if path.is_dir():
        return load_dir(path)
    if not path.is_file():
        raise ReportInputError(f"{path}: no such file or directory; {EXPECTED}")
    return load_file(path)


def load_dir(path: Path) -> ParsedLog:
    """A folder: finitetune's run directory, a Trainer output folder, or a tracker's store.

    Order: finitetune's own files; the Trainer's final ``trainer_state.json``; LLaMA-Factory's
    ``trainer_log.jsonl``; TensorBoard events (they cover the whole run); MLflow; trackio;
    W&B CSV exports; last, the newest checkpoint's ``trainer_state.json``.
    """
    from finitetune.report.run_reader import load_run_dir

    if run_files.is_run_dir(path):
        log = load_run_dir(path)
        state = None if (path / run_files.METRICS).is_file() else _trainer_state(path)
        if state is not None:  # a Trainer's output folder with GuardCallback's events.jsonl
            steps = load_file(state)
            log.records, log.evals, log.summary = steps.records, steps.evals, steps.summary
            log.notes = [n for n in log.notes if not n.startswith(run_files.METRICS)]
            log.notes.append(f"training steps read from {state.relative_to(path)}; guard "
                             f"events from {run_files.EVENTS}")
        return log
    for name in (run_files.TRAINER_STATE, LLAMA_FACTORY_LOG):
        if (path / name).is_file():
            return load_file(path / name)
    if event_dirs(path):
        return read_tensorboard(path)
    if trackers.mlflow_runs(path):
        return trackers.read_mlflow(path)
    dbs = [p for p in sorted(path.glob("*.db")) if trackers.is_trackio_db(p)]
    if dbs:
        return trackers.read_trackio(max(dbs, key=lambda p: p.stat().st_mtime))
    csvs = sorted(path.glob("*.csv"))
    if csvs:
        return trackers.read_wandb_csv(csvs)
    state = _trainer_state(path)
    if state is not None:
        return load_file(state)
    raise ReportInputError(f"{path}: a directory without {run_files.METRICS}, "
                           f"{run_files.TRAINER_STATE} or any log this report reads; {EXPECTED}")


def _trainer_state(path: Path) -> Path | None:
    """The Trainer's ``trainer_state.json`` in ``path``, else the newest checkpoint's."""
    for folder in (path, *reversed(run_files.checkpoints(path))):
        if (folder / run_files.TRAINER_STATE).is_file():
            return folder / run_files.TRAINER_STATE
    return None


def read_tensorboard(path: Path) -> ParsedLog:
    """The newest run folder of TensorBoard events at or under ``path``."""
    dirs = event_dirs(path) if path.is_dir() else [path]
    col = Collector()
    feed_by_step(col, EventReader(dirs[-1]).poll())
    log = col.finish(ParsedLog(str(dirs[-1]), "tensorboard"))
    if len(dirs) > 1:
        log.notes.append(f"{len(dirs)} TensorBoard runs found; read the newest, {dirs[-1]}")
    if not log.records and not log.evals:
        raise ReportInputError(f"{dirs[-1]}: TensorBoard events without loss or grad_norm scalars")
    return log


def load_file(path: Path) -> ParsedLog:
    """One file, by content (and, for trackers' files, by name)."""
    if path.name.startswith("events.out.tfevents."):
        return read_tensorboard(path)
    if path.suffix.lower() == ".csv":
        return trackers.read_wandb_csv([path])
    if trackers.is_trackio_db(path):
        return trackers.read_trackio(path)
    with open_text(path) as fh:
        head = fh.read(65536)
    mode = _sniff(head, str(path))
    if mode == "json":
        text = path.read_text(encoding="utf-8", errors="replace")
        return _whole_json(text, str(path), strict=path.suffix == ".json")
    if mode == "jsonl":
        with open_text(path) as fh:
            log = parse_jsonl(fh, str(path))
        return log
    if looks_like_json_members(head):
        salvaged = salvage_json(path.read_text(encoding="utf-8", errors="replace"), str(path),
                                "a part of a JSON document")
        if salvaged is not None:
            return salvaged
    return parse_console(path, str(path))


def parse_text(text: str, source: str = "<text>") -> ParsedLog:
    """Parse pasted text (console capture, JSON lines or a whole JSON document)."""
    mode = _sniff(text, source)
    if mode == "json":
        return _whole_json(text, source, strict=False)
    if mode == "jsonl":
        return parse_jsonl(text.split("\n"), source)
    if looks_like_json_members(text):
        salvaged = salvage_json(text, source, "a part of a JSON document")
        if salvaged is not None:
            return salvaged
    return parse_console(text, source)


def open_text(path: Path) -> io.TextIOWrapper:
    """Text reader that keeps ``\\r`` inside lines (progress-bar redraws are split by hand and
    line numbers in messages stay the file's own)."""
    return open(path, encoding="utf-8", errors="replace", newline="\n")


def _sniff(head: str, source: str) -> str:
    """``json`` (one document), ``jsonl`` or ``text``, from the start of the input."""
    stripped = head.lstrip()
    if not stripped:
        raise ReportInputError(f"{source}: the input is empty; {EXPECTED}")
    if stripped[0] == "[":
        return "json"
    first = stripped.split("\n", 1)[0].strip()
    if not first.startswith("{"):
        return "text"
    try:
        obj = json_loads(first, f"{source}, line 1")
    except NestingError:
        raise
    except ValueError:  # a pretty-printed document starts with '{' or '{"key": ...'
        return "json" if first == "{" or first.startswith('{"') else "text"
    return "json" if isinstance(obj, dict) and "log_history" in obj else "jsonl"


def _whole_json(text: str, source: str, strict: bool) -> ParsedLog:
    """trainer_state.json (``log_history``), a JSON list of log dicts, or what can be salvaged
    from a document that does not parse (cut off, pasted in part)."""
    try:
        # Python's reader accepts the bare NaN/Infinity HF writes
        data = json_loads(text, source)
    except json.JSONDecodeError as exc:
        why = f"{exc.msg} at line {exc.lineno}"
        salvaged = salvage_json(text, source, why)
        if salvaged is not None:
            return salvaged
        if not strict:
            return parse_console(text, source)
        lines = text.splitlines()
        bad = lines[exc.lineno - 1] if exc.lineno <= len(lines) else ""
        raise ReportInputError(f"{source}, line {exc.lineno}: expected JSON ({exc.msg}): "
                               f"{bad.strip()[:160]!r}; no log entry could be salvaged") from None
    if isinstance(data, dict) and isinstance(data.get("log_history"), list):
        log = from_records(data["log_history"], source)
        log.kind = "trainer_state"
    elif isinstance(data, list):
        log = from_records(data, source)
        log.kind = "json"
    else:
        raise ReportInputError(f"{source}: a JSON document without 'log_history'; {EXPECTED}")
    log.lines = text.count("\n") + 1
    if not log.records and not log.evals:
        raise ReportInputError(f"{source}: the JSON holds no loss, grad_norm or eval entries")
    return log


def parse_jsonl(lines: Iterable[str], source: str) -> ParsedLog:
    """One JSON object per line of someone's log (LLaMA-Factory's ``trainer_log.jsonl`` too).
    A bad last line is a writer that died mid-line: noted, not fatal. Any other bad line is
    fatal. (finitetune's own run files are read by :func:`finitetune.rundir.files.read_jsonl`.)"""
    col = Collector()
    log = ParsedLog(source, "jsonl")
    bad: list[tuple[int, str]] = []
    lineno = last = 0
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        last = lineno
        if bad:
            _raise_jsonl(source, *bad[0])
        try:
            entry = json_loads(text, f"{source}, line {lineno}")
        except NestingError:
            raise
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            col.add(entry)
        else:
            bad.append((lineno, text))
    for n, _ in bad:
        if n == last:
            log.notes.append(f"{source}, line {n}: truncated last line ignored (writer stopped?)")
    log.lines = lineno
    return col.finish(log)


def _raise_jsonl(source: str, lineno: int, text: str) -> None:
    raise ReportInputError(
        f"{source}, line {lineno}: expected one JSON object per line (JSON lines), got "
        f"{text[:160]!r}"
    )

"""Read training logs in every shape people have them into one list of numeric records.

Bug reports arrive as run directories, ``trainer_state.json`` files (with bare ``NaN`` tokens),
JSON lines, or console text pasted with progress bars, carriage returns, ANSI colours and
markdown fences around the Trainer's printed dicts. The health report must not care which, so
everything becomes :class:`ParsedLog`. Text is parsed streaming, line by line, with compiled
regexes and no ``ast``/``eval``: a million-line console capture parses in seconds (the console
scanner is :mod:`finitetune.report.console`; run directories are read by
:mod:`finitetune.report.run_reader`).
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finitetune.errors import ReportInputError
from finitetune.jsonio import decode_nonfinite

EXPECTED = (
    "expected a finitetune run directory (metrics.jsonl), a transformers trainer_state.json, "
    "JSON lines of log dicts, console text with the Trainer's printed dicts such as "
    "{'loss': 2.25, 'grad_norm': 1.57, 'learning_rate': 2e-05, 'epoch': 0.06}, "
    "or 'loss: 2.51  grad_norm: 1.2' lines"
)
_ALIASES = {
    "lr": "learning_rate", "learning_rate": "learning_rate", "gnorm": "grad_norm",
    "gradnorm": "grad_norm", "grad_norm": "grad_norm", "total_norm": "grad_norm",
    "global_step": "step", "iter": "step", "iteration": "step", "train_loss": "loss",
}


@dataclass
class ParsedLog:
    """Everything the health report reads, whatever the input format was."""

    source: str
    kind: str
    """``run_dir``, ``trainer_state``, ``json``, ``jsonl``, ``console``, ``key_value`` or
    ``records``."""
    records: list[dict[str, float]] = field(default_factory=list)
    """Training entries in log order; each has a ``step``; NaN/inf are kept as floats."""
    evals: list[dict[str, float]] = field(default_factory=list)
    """Entries with ``eval_*`` keys (the Trainer's evaluation logs)."""
    summary: dict[str, float] = field(default_factory=dict)
    """The Trainer's end-of-training dict (``train_runtime``, ``train_loss``...)."""
    events: list[dict[str, Any]] = field(default_factory=list)
    bad_samples: list[dict[str, Any]] = field(default_factory=list)
    """``bad_samples.jsonl``: the samples of steps skipped or rolled back for a fault."""
    eval: dict[str, Any] | None = None
    labels: dict[str, Any] | None = None
    vocab_size: int | None = None
    max_grad_norm: float | None = None
    lines: int = 0
    notes: list[str] = field(default_factory=list)


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
        from finitetune.report.run_reader import load_dir

        return load_dir(path)
    if not path.is_file():
        raise ReportInputError(f"{path}: no such file or directory; {EXPECTED}")
    return load_file(path)


def from_records(entries: Iterable[Mapping[str, Any]], source: str = "<records>") -> ParsedLog:
    """Parse in-memory log dicts, e.g. ``trainer.state.log_history``."""
    col = Collector()
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, Mapping):
            raise ReportInputError(f"{source}, entry {i}: expected a dict of log values, got "
                                   f"{type(entry).__name__}")
        col.add(entry)
    return col.finish(ParsedLog(source, "records"))


# ---------------------------------------------------------------------------------- records --
def _num(value: Any) -> float | None:
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(")") and "(" in text:  # np.float64(2.5), tensor(2.5)
            text = text[text.index("(") + 1 : -1].split(",")[0]
        try:
            return float(text)
        except ValueError:
            return None
    return None


_KEY_CACHE: dict[str, str] = {}
_BKEY_CACHE: dict[bytes, str] = {}


def norm_key(key: str) -> str:
    """Map the spellings of different loggers (``lr``, ``train/loss``, ``eval/loss``) to one."""
    norm = _KEY_CACHE.get(key)
    if norm is None:
        norm = key.strip().lower().replace(" ", "_").replace("-", "_")
        if norm.startswith("train/"):
            norm = norm[6:]
        elif norm.startswith("eval/"):
            norm = "eval_" + norm[5:]
        norm = _ALIASES.get(norm, norm)
        _KEY_CACHE[key] = norm
    return norm


class Collector:
    """Classify raw log dicts into training entries, evaluation entries and the summary."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.summary: dict[str, float] = {}
        self.stepless = 0

    def add(self, entry: Mapping[str, Any]) -> bool:
        if any(k.endswith("_nonfinite") for k in entry):
            entry = decode_nonfinite(entry)
        rec: dict[str, float] = {}
        for key, value in entry.items():
            x = _num(value)
            if x is not None:
                rec[norm_key(key)] = x
        return self.classify(rec, entry)

    def add_pairs(self, pairs: list[tuple[bytes, bytes, bytes, bytes]]) -> bool:
        """Fast path for console text: ``console._PAIR_B`` groups; ``float()`` reads bytes."""
        rec: dict[str, float] = {}
        for key, a, b, c in pairs:
            try:
                x = float(a or b or c)
            except ValueError:
                x = _num((a or b or c).decode("utf-8", "replace"))
                if x is None:
                    continue
            norm = _BKEY_CACHE.get(key)
            if norm is None:
                norm = _BKEY_CACHE[key] = norm_key(key.decode("utf-8", "replace"))
            rec[norm] = x
        if "train_runtime" in rec:
            return self.classify(rec, {k.decode("utf-8", "replace"): (a or b or c).decode(
                "utf-8", "replace") for k, a, b, c in pairs})
        return self.classify(rec, {})

    def classify(self, rec: dict[str, float], entry: Mapping[str, Any]) -> bool:
        if "train_runtime" in rec:  # the end-of-training summary: keep its own key names
            self.summary.update({k: x for k, v in entry.items() if (x := _num(v)) is not None})
            return True
        # loss or grad_norm: a dict with only a learning rate is a printed config, not a step
        if "loss" in rec or "grad_norm" in rec:
            step = rec.get("step")
            if step is None or not math.isfinite(step):
                self.stepless += 1
                rec["step"] = float(len(self.records) + 1)
            self.records.append(rec)
            return True
        if any(k.startswith("eval_") or is_accuracy(k) for k in rec):
            rec.setdefault("step", self.records[-1]["step"] if self.records else 0.0)
            self.evals.append(rec)
            return True
        return False

    def finish(self, log: ParsedLog) -> ParsedLog:
        log.records, log.evals, log.summary = self.records, self.evals, self.summary
        if self.stepless:
            log.notes.append("the log has no step numbers: steps are entry numbers 1, 2, 3...")
        return log


def is_accuracy(key: str) -> bool:
    """Accuracy-like metrics (``eval_accuracy``, ``mean_token_accuracy``, ``exact_match``,
    ``acc``); not ``gradient_accumulation``."""
    return ("accuracy" in key or "exact_match" in key or key == "acc" or key.endswith("_acc")
            or key.startswith("acc_"))


# ------------------------------------------------------------------------------------ files --
def open_text(path: Path) -> io.TextIOWrapper:
    # newline="\n": keep "\r" inside lines, so progress-bar redraws can be split off by hand
    # and line numbers in messages stay the file's own.
    return open(path, encoding="utf-8", errors="replace", newline="\n")


def load_file(path: Path) -> ParsedLog:
    with open_text(path) as fh:
        head = fh.read(65536)
    mode = _sniff(head, str(path))
    if mode == "json":
        text = path.read_text(encoding="utf-8", errors="replace")
        whole = _whole_json(text, str(path), strict=path.suffix == ".json")
        if whole is not None:
            return whole
    if mode == "jsonl":
        with open_text(path) as fh:
            return parse_jsonl(fh, str(path))
    from finitetune.report.console import parse_console  # imports this module

    return parse_console(path, str(path))


def parse_text(text: str, source: str = "<text>") -> ParsedLog:
    """Parse pasted text (console capture, JSON lines or a whole JSON document)."""
    mode = _sniff(text, source)
    if mode == "json":
        whole = _whole_json(text, source, strict=False)
        if whole is not None:
            return whole
    if mode == "jsonl":
        return parse_jsonl(text.split("\n"), source)
    from finitetune.report.console import parse_console  # imports this module

    return parse_console(text, source)


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
        obj = json.loads(first)
    except ValueError:  # a pretty-printed document starts with '{' or '{"key": ...'
        return "json" if first == "{" or first.startswith('{"') else "text"
    return "json" if isinstance(obj, dict) and "log_history" in obj else "jsonl"


def _whole_json(text: str, source: str, strict: bool) -> ParsedLog | None:
    """trainer_state.json (``log_history``) or a JSON list of log dicts; None: not JSON."""
    try:
        data = json.loads(text)  # Python's reader accepts the bare NaN/Infinity HF writes
    except json.JSONDecodeError as exc:
        if not strict:
            return None
        lines = text.splitlines()
        bad = lines[exc.lineno - 1] if exc.lineno <= len(lines) else ""
        raise ReportInputError(
            f"{source}, line {exc.lineno}: expected JSON ({exc.msg}): {bad.strip()[:160]!r}"
        ) from None
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
    """One JSON object per line of someone's log. A bad last line is a writer that died
    mid-line: noted, not fatal. Any other bad line is fatal. (finitetune's own run files are
    read by :func:`finitetune.run_files.read_jsonl`.)"""
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
            entry = json.loads(text)
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

"""Read training logs in every shape people have them into one list of numeric records.

Bug reports arrive as run directories, ``trainer_state.json`` files (with bare ``NaN`` tokens),
JSON lines, or console text pasted with progress bars, carriage returns, ANSI colours and
markdown fences around the Trainer's printed dicts. The health report must not care which, so
everything becomes :class:`ParsedLog`. Text is parsed streaming, line by line, with compiled
regexes and no ``ast``/``eval``: a million-line console capture parses in seconds.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finitetune.errors import ReportInputError

EXPECTED = (
    "expected a finitetune run directory (metrics.jsonl), a transformers trainer_state.json, "
    "JSON lines of log dicts, console text with the Trainer's printed dicts such as "
    "{'loss': 2.25, 'grad_norm': 1.57, 'learning_rate': 2e-05, 'epoch': 0.06}, "
    "or 'loss: 2.51  grad_norm: 1.2' lines"
)
TRAIN_KEYS = ("loss", "grad_norm", "learning_rate")
_ALIASES = {
    "lr": "learning_rate", "learning_rate": "learning_rate", "gnorm": "grad_norm",
    "gradnorm": "grad_norm", "grad_norm": "grad_norm", "total_norm": "grad_norm",
    "global_step": "step", "iter": "step", "iteration": "step", "train_loss": "loss",
}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]")
_DICT = re.compile(r"\{[^{}]*\}")
_PAIR = re.compile(r"""['"]([^'"]+)['"]\s*:\s*(?:'([^']*)'|"([^"]*)"|([^,}\s]+))""")
_NUM = r"[-+]?(?:nan|inf(?:inity)?|\d+\.?\d*(?:e[-+]?\d+)?|\.\d+(?:e[-+]?\d+)?)"
_KV = re.compile(
    r"(?<![\w'\"/.\-])([a-z][\w/.\-]*)(\s*[:=]\s*|\s+)(" + _NUM + r")(?![\w.])", re.IGNORECASE
)
_HINT = re.compile(r"loss|norm|acc|exact_match", re.IGNORECASE)


@dataclass
class ParsedLog:
    """Everything the health report reads, whatever the input format was."""

    source: str
    kind: str
    """``run_dir``, ``trainer_state``, ``json``, ``jsonl``, ``console``, ``key_value``, ``records``."""
    records: list[dict[str, float]] = field(default_factory=list)
    """Training entries in log order; each has a ``step``; NaN/inf are kept as floats."""
    evals: list[dict[str, float]] = field(default_factory=list)
    """Entries with ``eval_*`` keys (the Trainer's evaluation logs)."""
    summary: dict[str, float] = field(default_factory=dict)
    """The Trainer's end-of-training dict (``train_runtime``, ``train_loss``...)."""
    events: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    labels: dict[str, Any] | None = None
    vocab_size: int | None = None
    max_grad_norm: float | None = None
    lines: int = 0
    notes: list[str] = field(default_factory=list)


def load(source: str | os.PathLike | Iterable[Mapping[str, Any]] | ParsedLog) -> ParsedLog:
    """Detect the format of ``source`` and parse it; raise ReportInputError if it is none."""
    if isinstance(source, ParsedLog):
        return source
    if not isinstance(source, (str, os.PathLike)):
        return from_records(source)
    if str(source) == "-":
        return parse_text(sys.stdin.buffer.read().decode("utf-8", "replace"), "<stdin>")
    path = Path(source)
    if path.is_dir():
        return _load_dir(path)
    if not path.is_file():
        raise ReportInputError(f"{path}: no such file or directory; {EXPECTED}")
    return _load_file(path)


def from_records(entries: Iterable[Mapping[str, Any]], source: str = "<records>") -> ParsedLog:
    """Parse in-memory log dicts, e.g. ``trainer.state.log_history``."""
    col = _Collector()
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


def _norm_key(key: str) -> str:
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


def decode_nonfinite(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Undo finitetune's strict-JSON encoding: ``k: null, k_nonfinite: "nan"`` -> ``k: nan``."""
    out = dict(entry)
    for key, value in entry.items():
        if key.endswith("_nonfinite") and isinstance(value, str):
            base = key[: -len("_nonfinite")]
            if out.get(base) is None:
                out[base] = float(value)
            del out[key]
    return out


class _Collector:
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
                rec[_norm_key(key)] = x
        if "train_runtime" in rec:
            self.summary.update(rec)
            return True
        if any(k in rec for k in TRAIN_KEYS):
            if "step" not in rec or not math.isfinite(rec["step"]):
                self.stepless += 1
                rec["step"] = float(len(self.records) + 1)
            self.records.append(rec)
            return True
        if any(k.startswith("eval_") for k in rec) or any(_is_accuracy(k) for k in rec):
            rec.setdefault("step", self.records[-1]["step"] if self.records else 0.0)
            self.evals.append(rec)
            return True
        return False

    def finish(self, log: ParsedLog) -> ParsedLog:
        log.records, log.evals, log.summary = self.records, self.evals, self.summary
        if self.stepless:
            log.notes.append("the log has no step numbers: steps are entry numbers 1, 2, 3...")
        return log


def _is_accuracy(key: str) -> bool:
    return "acc" in key or "exact_match" in key


# ------------------------------------------------------------------------------------ files --
def _open_text(path: Path) -> io.TextIOWrapper:
    # newline="\n": keep "\r" inside lines, so progress-bar redraws can be split off by hand
    # and line numbers in messages stay the file's own.
    return open(path, encoding="utf-8", errors="replace", newline="\n")  # noqa: SIM115


def _load_file(path: Path) -> ParsedLog:
    with _open_text(path) as fh:
        head = fh.read(65536)
    mode = _sniff(head, str(path))
    if mode == "json":
        text = path.read_text(encoding="utf-8", errors="replace")
        whole = _whole_json(text, str(path), strict=path.suffix == ".json")
        if whole is not None:
            return whole
    with _open_text(path) as fh:
        if mode == "jsonl":
            return _parse_jsonl(fh, str(path), tolerant=False)
        return _parse_text(fh, str(path))


def parse_text(text: str, source: str = "<text>") -> ParsedLog:
    """Parse pasted text (console capture, JSON lines or a whole JSON document)."""
    mode = _sniff(text, source)
    if mode == "json":
        whole = _whole_json(text, source, strict=False)
        if whole is not None:
            return whole
    lines = iter(text.split("\n"))
    if mode == "jsonl":
        return _parse_jsonl(lines, source, tolerant=False)
    return _parse_text(lines, source)


def _sniff(head: str, source: str) -> str:
    """``json`` (one document), ``jsonl`` or ``text``, from the start of the input."""
    stripped = head.lstrip()
    if not stripped:
        raise ReportInputError(f"{source}: the input is empty; {EXPECTED}")
    first = stripped.split("\n", 1)[0].strip()
    if stripped[0] == "[" or (first.startswith("{") and not _is_json_object(first)):
        return "json"  # a pretty-printed document; falls back to text if it is not JSON
    return "jsonl" if first.startswith("{") else "text"


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


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


def _parse_jsonl(lines: Iterable[str], source: str, tolerant: bool) -> ParsedLog:
    col = _Collector()
    log = ParsedLog(source, "jsonl")
    pending: tuple[int, str] | None = None  # a bad line is fatal unless it is the last one
    lineno = 0
    for lineno, line in enumerate(lines, 1):  # noqa: B007
        text = line.strip()
        if not text:
            continue
        if pending is not None and not tolerant:
            _raise_jsonl(source, *pending)
        try:
            entry = json.loads(text)
            if not isinstance(entry, dict):
                raise ValueError
        except ValueError:
            if tolerant:
                log.notes.append(f"{source}, line {lineno}: not a JSON object, skipped")
            else:
                pending = (lineno, text)
            continue
        col.add(entry)
    if pending is not None:
        if pending[0] != lineno:
            _raise_jsonl(source, *pending)
        log.notes.append(f"line {pending[0]}: truncated last line ignored (writer stopped?)")
    log.lines = lineno
    return col.finish(log)


def _raise_jsonl(source: str, lineno: int, text: str) -> None:
    raise ReportInputError(
        f"{source}, line {lineno}: expected one JSON object per line (JSON lines), got "
        f"{text[:160]!r}"
    )


def _parse_text(lines: Iterable[str], source: str) -> ParsedLog:
    """Console captures: the Trainer's dict lines, else ``key: value`` lines.

    Dict lines win when both are present: a progress bar's ``loss=2.51`` postfix is redrawn
    many times per step and would count the same value again and again.
    """
    dicts, kvs = _Collector(), _Collector()
    first_text: tuple[int, str] | None = None
    lineno = 0
    for lineno, raw in enumerate(lines, 1):  # noqa: B007
        if "\x1b" in raw:
            raw = _ANSI.sub("", raw)
        for seg in raw.split("\r") if "\r" in raw else (raw,):
            found = False
            if "{" in seg:
                for match in _DICT.finditer(seg):
                    pairs = _PAIR.findall(match.group())
                    if pairs:
                        found |= dicts.add({k: a or b or c for k, a, b, c in pairs})
            if not found and not dicts.records and "%|" not in seg and _HINT.search(seg):
                entry = {k: v for k, sep, v in _KV.findall(seg)
                         if sep.strip() or _norm_key(k) in _KNOWN}
                if entry:
                    kvs.add(entry)
            if first_text is None and seg.strip():
                first_text = (lineno, seg.strip())
    col, kind = (dicts, "console") if dicts.records or dicts.evals else (kvs, "key_value")
    if not col.records and not col.evals:
        where = (f"first line (line {first_text[0]}): {first_text[1][:160]!r}"
                 if first_text else "the input holds only blank lines")
        raise ReportInputError(
            f"{source}: no training log entry found in {lineno} lines; {EXPECTED}. {where}"
        )
    log = col.finish(ParsedLog(source, kind, lines=lineno))
    return log


_KNOWN = frozenset(("loss", "grad_norm", "learning_rate", "step", "epoch"))


# ------------------------------------------------------------------------------ run folders --
def _load_dir(path: Path) -> ParsedLog:
    metrics = path / "metrics.jsonl"
    known = ("metrics.jsonl", "events.jsonl", "eval.json", "label_report.json", "config.yaml")
    if any((path / name).exists() for name in known):
        return load_run_dir(path)
    states = [path / "trainer_state.json"] + sorted(
        path.glob("checkpoint-*/trainer_state.json"),
        key=lambda p: int(p.parent.name.split("-")[-1]) if p.parent.name.split("-")[-1].isdigit()
        else -1,
    )[::-1]
    for state in states:
        if state.is_file():
            return _load_file(state)
    raise ReportInputError(f"{path}: a directory without {metrics.name} or trainer_state.json; "
                           f"{EXPECTED}")


def load_run_dir(path: str | os.PathLike) -> ParsedLog:
    """A finitetune run directory; tolerant of missing or half-written files (early stops)."""
    path = Path(path)
    log = ParsedLog(str(path), "run_dir")
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        with _open_text(metrics) as fh:
            parsed = _parse_jsonl(fh, metrics.name, tolerant=True)
        log.records, log.evals, log.summary = parsed.records, parsed.evals, parsed.summary
        log.lines, log.notes = parsed.lines, parsed.notes
    else:
        log.notes.append("metrics.jsonl is missing: no training step was logged")
    events = path / "events.jsonl"
    if events.is_file():
        with _open_text(events) as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        log.events.append(decode_nonfinite(json.loads(line)))
                    except (ValueError, AttributeError):
                        log.notes.append(f"events.jsonl, line {lineno}: unreadable, skipped")
    log.eval = _read_json(path / "eval.json", log)
    log.labels = _read_json(path / "label_report.json", log)
    _read_config(path, log)
    return log


def _read_json(path: Path, log: ParsedLog) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError:
        log.notes.append(f"{path.name}: not valid JSON, ignored")
        return None
    if not isinstance(data, dict):
        return None
    return {k: decode_nonfinite(v) if isinstance(v, dict) else v
            for k, v in decode_nonfinite(data).items()}


def _read_config(path: Path, log: ParsedLog) -> None:
    """Clip value and vocabulary size, when the run recorded them (config.yaml, config.json)."""
    cfg: Any = None
    if (path / "config.yaml").is_file():
        try:
            import yaml  # lazy: only run directories need it

            cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        except Exception as exc:  # a broken config must not stop the report of a dead run
            log.notes.append(f"config.yaml unreadable ({type(exc).__name__}), ignored")
    if isinstance(cfg, dict):
        guard = cfg.get("guard") if isinstance(cfg.get("guard"), dict) else {}
        for value in (guard.get("max_grad_norm"), cfg.get("max_grad_norm")):
            if isinstance(value, (int, float)) and value > 0:
                log.max_grad_norm = float(value)
                break
    for candidate in (cfg, _read_json(path / "config.json", log)):
        vocab = _find_key(candidate, "vocab_size")
        if isinstance(vocab, int) and vocab > 1:
            log.vocab_size = vocab
            break


def _find_key(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for value in obj.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None

"""Run directories: finitetune's own (metrics, events, eval, labels, config) or a Trainer's.

A run that stopped early leaves some files missing or a last line half-written; its report is
the one that matters most, so everything here is tolerant: what cannot be read becomes a note
in the report, not an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finitetune.errors import ReportInputError
from finitetune.report.parse import (
    EXPECTED,
    ParsedLog,
    decode_nonfinite,
    load_file,
    open_text,
    parse_jsonl,
)

RUN_FILES = ("metrics.jsonl", "events.jsonl", "eval.json", "label_report.json", "config.yaml")


def load_dir(path: Path) -> ParsedLog:
    """A finitetune run directory, else a Trainer output dir (its newest trainer_state.json)."""
    if any((path / name).exists() for name in RUN_FILES):
        return load_run_dir(path)
    checkpoints = sorted(path.glob("checkpoint-*/trainer_state.json"), key=_checkpoint_number)
    states = [path / "trainer_state.json", *reversed(checkpoints)]  # newest checkpoint first
    for state in states:
        if state.is_file():
            return load_file(state)
    raise ReportInputError(f"{path}: a directory without metrics.jsonl or trainer_state.json; "
                           f"{EXPECTED}")


def _checkpoint_number(state: Path) -> int:
    suffix = state.parent.name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def load_run_dir(path: str | os.PathLike) -> ParsedLog:
    """A finitetune run directory; tolerant of missing or half-written files (early stops)."""
    path = Path(path)
    log = ParsedLog(str(path), "run_dir")
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        with open_text(metrics) as fh:
            parsed = parse_jsonl(fh, metrics.name, tolerant=True)
        log.records, log.evals, log.summary = parsed.records, parsed.evals, parsed.summary
        log.lines, log.notes = parsed.lines, parsed.notes
    else:
        log.notes.append("metrics.jsonl is missing: no training step was logged")
    events = path / "events.jsonl"
    if events.is_file():
        with open_text(events) as fh:
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
    model_configs = [path / "config.json", path / "final" / "config.json",
                     *sorted(path.glob("checkpoint-*/config.json"))]
    for candidate in (cfg, *(_read_json(p, log) for p in model_configs)):
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

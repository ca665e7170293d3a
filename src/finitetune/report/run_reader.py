"""Run directories: finitetune's own (metrics, events, eval, labels, config) or a Trainer's.

A run that stopped early leaves some files missing or a last line half-written; its report is
the one that matters most, so everything here is tolerant: what cannot be read becomes a note
in the report, not an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finitetune.errors import NestingError
from finitetune.parsing.nesting import check_yaml, json_loads
from finitetune.report.records import Collector, ParsedLog
from finitetune.rundir import files as run_files
from finitetune.rundir.jsonio import decode_nonfinite


def load_run_dir(path: str | os.PathLike) -> ParsedLog:
    """A finitetune run directory; tolerant of missing or half-written files (early stops)."""
    path = Path(path)
    log = ParsedLog(str(path), "run_dir")
    metrics = path / run_files.METRICS
    if metrics.is_file():
        read = run_files.read_jsonl(metrics, run_files.Tolerance.TOLERANT)
        collector = Collector()
        for record in read.records:
            collector.add(record)
        collector.finish(log)
        log.lines, log.notes = read.lines, [*log.notes, *read.notes]
    else:
        log.notes.append(f"{run_files.METRICS} is missing: no training step was logged")
    events = run_files.read_jsonl(path / run_files.EVENTS, run_files.Tolerance.TOLERANT,
                                  decode=True)
    log.events, log.notes = events.records, [*log.notes, *events.notes]
    bad = run_files.read_jsonl(path / run_files.BAD_SAMPLES, run_files.Tolerance.TOLERANT)
    log.bad_samples, log.notes = bad.records, [*log.notes, *bad.notes]
    log.eval = _read_json(path / run_files.EVAL, log)
    log.labels = _read_json(path / run_files.LABEL_REPORT, log)
    log.status = _read_json(path / run_files.STATUS, log)
    log.writer = run_files.lock_holder(path)
    log.writer_gone = log.writer is None and run_files.writer_gone(path)
    _read_config(path, log)
    return log


def _read_json(path: Path, log: ParsedLog) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json_loads(path.read_text(encoding="utf-8", errors="replace"), str(path))
    except NestingError as exc:
        log.notes.append(f"{path.name}: ignored: {exc}")
        return None
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
    if (path / run_files.CONFIG).is_file():
        try:
            import yaml  # lazy: only run directories need it

            text = (path / run_files.CONFIG).read_text(encoding="utf-8")
            check_yaml(text, str(path / run_files.CONFIG))
            cfg = yaml.safe_load(text)
        except Exception as exc:  # a broken config must not stop the report of a dead run
            log.notes.append(f"config.yaml unreadable ({type(exc).__name__}), ignored")
    if isinstance(cfg, dict):
        guard: dict[str, Any] = cfg["guard"] if isinstance(cfg.get("guard"), dict) else {}
        for value in (guard.get("max_grad_norm"), cfg.get("max_grad_norm")):
            if isinstance(value, (int, float)) and value > 0:
                log.max_grad_norm = float(value)
                break
    model_configs = [path / "config.json", path / run_files.FINAL_DIR / "config.json",
                     *(c / "config.json" for c in run_files.checkpoints(path))]
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

"""Log records: what every reader produces and the analysis reads (the report's first layer).

Bug reports arrive in many shapes (run directories, ``trainer_state.json``, JSON lines, console
text, TensorBoard, MLflow, trackio, W&B exports); each reader turns its shape into log dicts and
feeds them to one :class:`Collector`, which maps the names (:mod:`finitetune.report.names`),
reads the numbers and sorts each dict into training entries, evaluations or the end-of-training
summary. The result is a :class:`ParsedLog`. Nothing here knows a file format.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from finitetune.errors import ReportInputError
from finitetune.report.names import IGNORED, PREFIXES, SUMMARY_KEYS, is_alias, norm_key
from finitetune.rundir.jsonio import decode_nonfinite

__all__ = ["Collector", "ParsedLog", "feed_by_step", "from_records", "is_accuracy", "to_number"]


@dataclass
class ParsedLog:
    """Everything the health report reads, whatever the input format was."""

    source: str
    kind: str
    """How it was read: ``run_dir``, ``trainer_state``, ``json``, ``jsonl``, ``console``,
    ``key_value``, ``tensorboard``, ``mlflow``, ``trackio``, ``wandb_csv``, ``records``..."""
    records: list[dict[str, float]] = field(default_factory=list)
    """Training entries in log order; each has a ``step``; NaN/inf are kept as floats."""
    evals: list[dict[str, float]] = field(default_factory=list)
    """Entries with ``eval_*`` keys (the Trainer's evaluation logs)."""
    summary: dict[str, float] = field(default_factory=dict)
    """The Trainer's end-of-training dict (``train_runtime``, ``train_loss``...)."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """Guard events (finitetune's ``events.jsonl``) and skips a console log announced."""
    bad_samples: list[dict[str, Any]] = field(default_factory=list)
    """``bad_samples.jsonl``: the samples of steps skipped or rolled back for a fault."""
    eval: dict[str, Any] | None = None
    labels: dict[str, Any] | None = None
    vocab_size: int | None = None
    max_grad_norm: float | None = None
    status: dict[str, Any] | None = None
    """A finitetune run's ``status.json``: ``state`` (running/completed/halted/failed), ``step``,
    ``error``. A failed or halted run is never healthy."""
    writer: str | None = None
    """Who holds the run directory's lock right now (a run still going), else None."""
    writer_gone: bool = False
    """The process that wrote the run directory has certainly ended (``run_files.writer_gone``)."""
    lines: int = 0
    notes: list[str] = field(default_factory=list)


def to_number(value: Any) -> float | None:
    """A float from a log value: numbers, numeric strings (``'2.5'``, ``'nan'``, ``'NaN'``),
    ``np.float64(2.5)`` / ``tensor(2.5)`` reprs, or ``'12/300'`` progress (12). None otherwise."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith(")") and "(" in text:
        text = text[text.index("(") + 1 : -1].split(",")[0]
    try:
        return float(text)
    except ValueError:
        pass
    head, sep, _ = text.partition("/")
    if sep and head.strip().isdigit():
        return float(head)
    return None


def is_accuracy(key: str) -> bool:
    """Accuracy-like metrics (``eval_accuracy``, ``mean_token_accuracy``, ``exact_match``,
    ``acc``); not ``gradient_accumulation``."""
    return ("accuracy" in key or "exact_match" in key or key == "acc" or key.endswith("_acc")
            or key.startswith("acc_"))


class Collector:
    """Classify raw log dicts into training entries, evaluation entries and the summary."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.summary: dict[str, float] = {}
        self.events: list[dict[str, Any]] = []
        self.stepless = 0
        self._bkeys: dict[bytes, str] = {}

    def add(self, entry: Mapping[str, Any]) -> bool:
        """One log dict; returns whether it was a training, eval or summary entry."""
        if any(k.endswith("_nonfinite") for k in entry):
            entry = decode_nonfinite(entry)
        rec: dict[str, float] = {}
        for key, value in entry.items():
            x = to_number(value)
            if x is not None:
                norm = norm_key(key)
                if norm not in IGNORED and not (norm in rec and is_alias(key)):
                    rec[norm] = x
        return self.classify(rec, entry)

    def add_pairs(self, pairs: list[tuple[bytes, bytes, bytes, bytes]]) -> bool:
        """Fast path for console dicts (regex groups as bytes; ``float()`` reads bytes)."""
        rec: dict[str, float] = {}
        for key, a, b, c in pairs:
            raw = a or b or c
            try:
                x = float(raw)
            except ValueError:
                y = to_number(raw.decode("utf-8", "replace"))
                if y is None:
                    continue
                x = y
            norm = self._bkeys.get(key)
            if norm is None:
                norm = self._bkeys[key] = norm_key(key.decode("utf-8", "replace"))
            if norm in rec and is_alias(key.decode("utf-8", "replace")):
                continue  # the name's own value beats an alias's (loss over loss_avg)
            rec[norm] = x
        if "train_runtime" in rec:
            return self.classify(rec, {k.decode("utf-8", "replace"): (a or b or c).decode(
                "utf-8", "replace") for k, a, b, c in pairs})
        return self.classify(rec, {})

    def classify(self, rec: dict[str, float], entry: Mapping[str, Any]) -> bool:
        """File ``rec`` (normalised names) as summary, training entry or evaluation."""
        if "train_runtime" in rec:  # the end-of-training summary: keep its own key names
            self.summary.update({k: x for k, v in entry.items() if (x := to_number(v)) is not None})
            return True
        # loss or grad_norm: a dict with only a learning rate is a printed config, not a step
        if "loss" in rec or "grad_norm" in rec:
            step = rec.get("step")
            if step is None or not math.isfinite(step):
                self.stepless += 1  # numbered after the previous entry
                rec["step"] = self.records[-1]["step"] + 1 if self.records else 1.0
            self.records.append(rec)
            evals = {k: v for k, v in rec.items() if k.startswith("eval_")}
            if evals:  # "step 100: train loss 2.3, val loss 2.4" is both
                self.evals.append({"step": rec["step"], **evals})
            return True
        if any(k.startswith("eval_") or is_accuracy(k) for k in rec):
            rec.setdefault("step", self.records[-1]["step"] if self.records else 0.0)
            self.evals.append(rec)
            return True
        return False

    def add_event(self, event: dict[str, Any]) -> None:
        """An event a log announced (e.g. a loss-scale skip); placed after the last entry."""
        event.setdefault("step", self.records[-1]["step"] + 1 if self.records else 1.0)
        self.events.append(event)

    def finish(self, log: ParsedLog) -> ParsedLog:
        """Move what was collected into ``log`` (keeping its notes) and return it."""
        log.records, log.evals, log.summary = self.records, self.evals, self.summary
        log.events = [*log.events, *self.events]
        if self.stepless == len(self.records) and self.stepless:
            log.notes.append("the log has no step numbers: steps are entry numbers 1, 2, 3...")
        elif self.stepless:
            log.notes.append(f"{self.stepless} entries without a step number were numbered "
                             "after the entry before them")
        return log


def from_records(entries: Iterable[Mapping[str, Any]], source: str = "<records>") -> ParsedLog:
    """Parse in-memory log dicts, e.g. ``trainer.state.log_history``."""
    col = Collector()
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, Mapping):
            raise ReportInputError(f"{source}, entry {i}: expected a dict of log values, got "
                                   f"{type(entry).__name__}")
        col.add(entry)
    return col.finish(ParsedLog(source, "records"))


def feed_by_step(col: Collector, rows: Mapping[float, Mapping[str, float]]) -> None:
    """Feed values that a tracker stores per metric (TensorBoard, MLflow, W&B exports) as one
    log dict per step, in step order. The end-of-training keys are taken out first: trackers
    store them at the last step, beside that step's own loss."""
    for step in sorted(rows):
        entry = dict(rows[step])
        summary = {k: entry.pop(k) for k in list(entry) if _bare(k) in SUMMARY_KEYS}
        if summary:
            col.summary.update({_bare(k): v for k, v in summary.items()})
        if entry:
            col.add({**entry, "step": step})


def _bare(key: str) -> str:
    low = key.strip().lower()
    for prefix, _ in PREFIXES:
        if low.startswith(prefix):
            return low[len(prefix):]
    return low

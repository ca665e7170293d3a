"""Experiment trackers' local stores: MLflow's ``mlruns/``, trackio's SQLite, W&B CSV exports.

Each store keeps a run's metrics in its own layout; each reader turns one run into the log
dicts every other format gives (:class:`~finitetune.report.records.Collector`), with the
names mapped by :mod:`finitetune.report.names`. A store with several runs is read for its
newest run, and the report says which one and which others exist. Standard library only: these
are plain files (MLflow's file store is text, trackio's store is SQLite, a W&B export is CSV).
"""

from __future__ import annotations

import csv
import re
import sqlite3
from pathlib import Path

from finitetune.errors import ReportInputError
from finitetune.parsing.nesting import json_loads
from finitetune.report.records import Collector, ParsedLog, feed_by_step, to_number

__all__ = ["is_trackio_db", "mlflow_runs", "read_mlflow", "read_trackio", "read_wandb_csv"]

_STEP_COLUMNS = ("train/global_step", "trainer/global_step", "global_step", "step", "_step")
"""A W&B export's x axis, best first (W&B's ``_step`` counts log calls, not optimizer steps)."""


# ------------------------------------------------------------------------------ MLflow --
def mlflow_runs(path: Path) -> list[Path]:
    """Run folders (``<experiment>/<run>/metrics`` + ``meta.yaml``) at or under ``path``,
    oldest first by their recorded start time."""
    if (path / "metrics").is_dir() and (path / "meta.yaml").is_file():
        return [path]
    root = path / "mlruns" if (path / "mlruns").is_dir() else path
    runs = [m.parent for pattern in ("*/meta.yaml", "*/*/meta.yaml") for m in root.glob(pattern)
            if (m.parent / "metrics").is_dir()]
    return sorted(set(runs), key=_start_time)


def _start_time(run: Path) -> float:
    m = re.search(r"^start_time:\s*(\d+)", (run / "meta.yaml").read_text(errors="replace"), re.M)
    return float(m.group(1)) if m else run.stat().st_mtime


def read_mlflow(path: Path) -> ParsedLog:
    """The newest run of an MLflow file store: one file per metric, ``timestamp value step``
    per line (a metric named ``train/loss`` is the file ``metrics/train/loss``)."""
    runs = mlflow_runs(path)
    if not runs:
        raise ReportInputError(f"{path}: no MLflow run (a folder with metrics/ and meta.yaml)")
    run = runs[-1]
    rows: dict[float, dict[str, float]] = {}
    metrics = run / "metrics"
    for file in sorted(p for p in metrics.rglob("*") if p.is_file()):
        key = file.relative_to(metrics).as_posix()
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 3 and (value := to_number(parts[1])) is not None:
                rows.setdefault(float(parts[2]), {})[key] = value
    col = Collector()
    feed_by_step(col, rows)
    log = col.finish(ParsedLog(str(run), "mlflow"))
    if len(runs) > 1:
        log.notes.append(f"MLflow store holds {len(runs)} runs; read the newest, {run.name} "
                         "(pass a run's folder to read another)")
    return log


# ------------------------------------------------------------------------------ trackio --
def is_trackio_db(path: Path) -> bool:
    """An SQLite file with trackio's ``metrics(run_name, step, metrics)`` table."""
    try:
        with open(path, "rb") as fh:
            if fh.read(16) != b"SQLite format 3\x00":
                return False
        with _connect(path) as db:
            cols = {row[1] for row in db.execute("PRAGMA table_info(metrics)")}
    except (OSError, sqlite3.Error):
        return False
    return {"run_name", "step", "metrics"} <= cols


def _connect(path: Path) -> sqlite3.Connection:
    # read-only: a running trackio may be writing to it
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def read_trackio(path: Path, run: str | None = None) -> ParsedLog:
    """The newest run (or ``run``) of a trackio project database: one row per log call, the
    metrics as JSON (NaN stored as the string ``"NaN"``); the Trainer's step is in
    ``train/global_step`` (trackio's own ``step`` counts log calls)."""
    try:
        with _connect(path) as db:
            names = [r[0] for r in db.execute(
                "SELECT run_name FROM metrics GROUP BY run_name ORDER BY MAX(id)")]
            if not names:
                raise ReportInputError(f"{path}: the trackio store holds no logged metrics")
            chosen = run if run is not None else names[-1]
            rows = db.execute("SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY id",
                              (chosen,)).fetchall()
    except sqlite3.Error as exc:
        raise ReportInputError(f"{path}: cannot read the trackio store: {exc}") from exc
    col = Collector()
    for step, text in rows:
        try:
            entry = json_loads(text, f"{path}, step {step}")
        except ValueError:
            continue
        if isinstance(entry, dict):
            col.add({"step": step, **entry})  # train/global_step, when logged, overrides it
    log = col.finish(ParsedLog(f"{path} (run {chosen})", "trackio"))
    if len(names) > 1:
        log.notes.append(f"trackio store holds {len(names)} runs; read the newest, {chosen}")
    return log


# -------------------------------------------------------------------------- W&B export --
def read_wandb_csv(paths: list[Path]) -> ParsedLog:
    """W&B CSV exports: a chart panel's (``Step``, ``<run> - train/loss``, ``...__MIN``,
    ``...__MAX``) or a run history's (``_step``, ``train/loss``...); one file or a folder of
    them (one per panel), merged by step. With several runs in a panel, the first is read."""
    rows: dict[float, dict[str, float]] = {}
    runs: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
            table = list(csv.reader(fh))
        if not table:
            continue
        _merge_csv(path, table, rows, runs)
    if not rows:
        raise ReportInputError(f"{paths[0]}: no step column with metric values found; expected a "
                               "W&B CSV export (a 'Step' column and '<run> - <metric>' columns)")
    col = Collector()
    feed_by_step(col, rows)
    log = col.finish(ParsedLog(str(paths[0].parent if len(paths) > 1 else paths[0]), "wandb_csv"))
    if len(set(runs)) > 1:
        log.notes.append(f"the export holds {len(set(runs))} runs; read {runs[0]}")
    return log


def _merge_csv(path: Path, table: list[list[str]], rows: dict[float, dict[str, float]],
               runs: list[str]) -> None:
    header = [h.strip() for h in table[0]]
    step_col = next((header.index(c) for c in _STEP_COLUMNS if c in header), None)
    if step_col is None and header and header[0].lower() == "step":
        step_col = 0
    if step_col is None:
        raise ReportInputError(f"{path}: no step column (one of Step, {', '.join(_STEP_COLUMNS)})")
    columns: list[tuple[int, str]] = []
    for i, name in enumerate(header):
        if (i == step_col or not name or name.endswith(("__MIN", "__MAX"))
                or name in _STEP_COLUMNS):  # an unnamed column is pandas' index
            continue
        run, sep, metric = name.rpartition(" - ")
        if sep:  # a panel export: "<run name> - <metric>"
            runs.append(run)
            if run != runs[0]:
                continue
        columns.append((i, metric if sep else name))
    for row in table[1:]:
        step = to_number(row[step_col]) if step_col < len(row) else None
        if step is None:
            continue
        for i, metric in columns:
            value = to_number(row[i]) if i < len(row) else None
            if value is not None:
                rows.setdefault(step, {})[metric] = value

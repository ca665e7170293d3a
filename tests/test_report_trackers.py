"""`finitetune report` reads what experiment trackers wrote during a REAL Trainer run and gives
the same numbers as the run's own trainer_state.json.

One tiny Trainer run (tests/report_tracker_run.py, in a subprocess) reports to TensorBoard,
MLflow (file store), trackio and W&B (offline) at once; from step 8 on its loss is NaN, so the
non-finite path is compared too. W&B cannot export CSV offline (its export lives in the web
app), so the W&B test reads the offline run's history with W&B's own protobuf schema and writes
it as the app's chart export lays it out (``Step``, ``<run> - <metric>``, ``__MIN``/``__MAX``);
the numbers are the run's, the CSV layout is reproduced.
"""

from __future__ import annotations

import csv
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from finitetune.cli.main import main
from finitetune.report import health_report
from finitetune.report.load import load

HERE = Path(__file__).parent
KEYS = ("loss", "grad_norm", "learning_rate", "epoch")


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory) -> Path:
    pytest.importorskip("tensorboard", reason="the `logs` extra (tensorboard) is not installed")
    for module in ("mlflow", "trackio", "wandb"):
        pytest.importorskip(module, reason=f"{module} (a dev dependency) is not installed")
    out = tmp_path_factory.mktemp("tracked")
    proc = subprocess.run([sys.executable, str(HERE / "report_tracker_run.py"), tiny_model_dir,
                           str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _same(a: float | None, b: float | None, rel: float) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _assert_same_numbers(path: Path, reference: Path, kind: str, rel: float = 1e-12) -> None:
    ref, got = load(reference), load(path)
    assert got.kind == kind
    assert [r["step"] for r in got.records] == [r["step"] for r in ref.records] == list(
        map(float, range(1, 13)))
    for a, b in zip(ref.records, got.records, strict=True):
        for key in KEYS:
            assert _same(a.get(key), b.get(key), rel), (kind, a["step"], key, a.get(key),
                                                         b.get(key))
    assert [(e["step"], e["eval_loss"]) for e in got.evals] != []
    for a, b in zip(ref.evals, got.evals, strict=True):
        assert a["step"] == b["step"] and _same(a["eval_loss"], b["eval_loss"], rel)
    # and the report built on it says the same as the one built on trainer_state.json
    r_ref, r_got = health_report(reference), health_report(path)
    assert r_got.verdict == r_ref.verdict == "unhealthy"
    assert [f.rule for f in r_got.findings] == [f.rule for f in r_ref.findings]
    for name in ("loss", "grad_norm", "eval_loss"):
        s, t = r_ref.metrics[name], r_got.metrics[name]
        assert (s.total, s.valid, s.nan, s.inf) == (t.total, t.valid, t.nan, t.inf)
        assert _same(s.mean, t.mean, rel) and _same(s.max, t.max, rel)
    assert main(["report", str(path), "--format", "json", "-o", str(path.parent / "r.json")]) == 1


@pytest.mark.slow
def test_tensorboard_dir_from_report_to_tensorboard(tracked_run):
    runs = tracked_run / "out" / "runs"
    assert list(runs.glob("*/events.out.tfevents.*"))
    # TensorBoard stores float32: equal to the run's numbers to float32 precision
    _assert_same_numbers(runs, tracked_run / "out" / "trainer_state.json", "tensorboard", 1e-6)


@pytest.mark.slow
def test_mlflow_file_store(tracked_run):
    assert list((tracked_run / "mlruns").glob("*/*/metrics/loss"))
    _assert_same_numbers(tracked_run / "mlruns", tracked_run / "out" / "trainer_state.json",
                         "mlflow")


@pytest.mark.slow
def test_trackio_store(tracked_run):
    db = tracked_run / "trackio" / "huggingface.db"
    _assert_same_numbers(db, tracked_run / "out" / "trainer_state.json", "trackio")
    assert load(tracked_run / "trackio").kind == "trackio"  # the store's folder works too


@pytest.mark.slow
def test_wandb_csv_export(tracked_run, tmp_path):
    history = _wandb_history(next((tracked_run / "wandb").glob("offline-run-*/run-*.wandb")))
    assert len(history) >= 12
    export = tmp_path / "wandb_export"
    _write_panel_csvs(history, export, run="tiny-run")
    _assert_same_numbers(export, tracked_run / "out" / "trainer_state.json", "wandb_csv")
    one = export / "train_loss.csv"  # one panel alone: the loss only
    assert [r["step"] for r in load(one).records] == list(map(float, range(1, 13)))


# ------------------------------------------------------------------ W&B offline -> CSV --
def _wandb_history(path: Path) -> list[dict[str, float]]:
    """History rows of an offline ``.wandb`` file: W&B's LevelDB-style log of protobuf
    ``Record`` messages (7-byte header; 32 KiB blocks of CRC, length, type, payload)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, buf, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            records.append(buf + chunk)
    rows = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): float(item.value_json)
                         for item in rec.history.item if _is_number(item.value_json)})
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _write_panel_csvs(history: list[dict[str, float]], folder: Path, run: str) -> None:
    """One CSV per chart, as the W&B app exports a panel: x axis (the Trainer's W&B callback
    plots against ``train/global_step``), the run's value, and its ``__MIN``/``__MAX``."""
    folder.mkdir()
    metrics = sorted({k for row in history for k in row
                      if k.startswith(("train/", "eval/")) and k != "train/global_step"})
    for metric in metrics:
        with open(folder / (metric.replace("/", "_") + ".csv"), "w", newline="") as fh:
            w = csv.writer(fh, quoting=csv.QUOTE_ALL)
            w.writerow(["train/global_step", f"{run} - {metric}", f"{run} - {metric}__MIN",
                        f"{run} - {metric}__MAX"])
            for row in history:
                if metric in row:
                    v = "NaN" if math.isnan(row[metric]) else repr(row[metric])
                    w.writerow([int(row["train/global_step"]), v, v, v])


def test_wandb_history_csv_and_a_panel_with_two_runs(tmp_path):
    """The other W&B CSV shape (``run.history().to_csv()``: pandas' index, ``_step``) and a
    panel export holding two runs: the first is read, the note names the count."""
    hist = tmp_path / "history.csv"
    hist.write_text(",_step,_runtime,train/loss,train/grad_norm,train/global_step\n"
                    "0,0,1.5,2.5,1.1,10\n1,1,2.5,NaN,NaN,20\n2,2,3.5,,,30\n")
    log = load(hist)
    assert (log.records[0]["step"], log.records[0]["loss"]) == (10.0, 2.5)
    assert math.isnan(log.records[1]["grad_norm"]) and len(log.records) == 2
    panel = tmp_path / "panel.csv"
    panel.write_text('"Step","a - train/loss","a - train/loss__MIN","a - train/loss__MAX",'
                     '"b - train/loss","b - train/loss__MIN","b - train/loss__MAX"\n'
                     '"1","2.0","2.0","2.0","9.0","9.0","9.0"\n"2","1.5","1.5","1.5","8.0","8.0","8.0"\n')
    log = load(panel)
    assert [r["loss"] for r in log.records] == [2.0, 1.5] and log.kind == "wandb_csv"
    assert log.notes == ["the export holds 2 runs; read a"]

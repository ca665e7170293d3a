"""The run directory's one owner: file names, the JSON-lines reader's three tolerances, resume
trimming, and the one Trainer builder shared by ``finitetune train`` and ``finitetune verify``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finitetune.errors import ReportInputError
from finitetune.rundir import files as run_files
from finitetune.rundir.files import Tolerance, read_jsonl, trim_jsonl

GOOD = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None, "loss_nonfinite": "nan"},
        {"step": 3, "loss": 1.5}]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(ln + "\n" for ln in lines))
    return path


@pytest.fixture
def torn(tmp_path) -> Path:
    """Three good lines, then a line a killed writer left half-written (no newline)."""
    path = _write(tmp_path / run_files.METRICS, [json.dumps(r) for r in GOOD])
    with open(path, "a") as fh:
        fh.write('{"step": 4, "lo')
    return path


def test_strict_names_file_and_line_of_a_torn_line(torn):
    with pytest.raises(ReportInputError, match=r"metrics.jsonl:4: not valid JSON \(the last line"):
        read_jsonl(torn, Tolerance.STRICT)
    assert torn.read_text().endswith('"lo')  # strict never writes


def test_strict_names_a_bad_middle_line(tmp_path):
    path = _write(tmp_path / "events.jsonl", ['{"step": 1}', "[1, 2]", '{"step": 3}'])
    with pytest.raises(ReportInputError, match=r"events.jsonl:2: not valid JSON \(not a JSON obj"):
        read_jsonl(path, "strict")


def test_tolerant_skips_and_notes_without_writing(torn):
    before = torn.read_bytes()
    read = read_jsonl(torn, Tolerance.TOLERANT)
    assert [r["step"] for r in read.records] == [1, 2, 3]
    assert read.notes == ["metrics.jsonl, line 4: truncated last line (the writer stopped?), "
                          "skipped"]
    assert torn.read_bytes() == before


def test_repair_removes_the_torn_line_so_appends_stay_clean(torn):
    read = read_jsonl(torn, Tolerance.REPAIR)
    assert len(read.records) == 3 and "removed" in read.notes[0]
    with open(torn, "a") as fh:  # what a resumed run does next
        fh.write(json.dumps({"step": 4, "loss": 1.0}) + "\n")
    again = read_jsonl(torn, Tolerance.STRICT)
    assert [r["step"] for r in again.records] == [1, 2, 3, 4]


def test_decode_restores_nonfinite_values(tmp_path):
    path = _write(tmp_path / "m.jsonl", [json.dumps(r) for r in GOOD])
    raw = read_jsonl(path).records[1]
    assert raw == {"step": 2, "loss": None, "loss_nonfinite": "nan"}
    decoded = read_jsonl(path, decode=True).records[1]
    assert decoded["loss"] != decoded["loss"] and "loss_nonfinite" not in decoded


def test_missing_file_reads_as_empty(tmp_path):
    read = read_jsonl(tmp_path / "nope.jsonl", Tolerance.STRICT)
    assert read.records == [] and read.notes == [] and read.lines == 0


def test_trim_drops_steps_after_the_checkpoint_and_repairs(torn):
    kept = trim_jsonl(torn, last_step=2)
    assert [r["step"] for r in kept.records] == [1, 2]
    lines = torn.read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2]
    # encoded non-finite values survive the rewrite untouched (strict JSON, flag kept)
    assert json.loads(lines[1]) == GOOD[1]


def test_checkpoints_sorted_by_step_not_by_name(tmp_path):
    for step in (10, 9, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "checkpoint-7").write_text("a file, not a checkpoint")
    assert [p.name for p in run_files.checkpoints(tmp_path)] == [
        "checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert run_files.checkpoint_step("x/checkpoint-12") == 12
    assert run_files.checkpoint_step("x/checkpoint-best") is None


def test_is_run_dir(tmp_path):
    assert not run_files.is_run_dir(tmp_path)
    (tmp_path / run_files.CONFIG).write_text("model: tiny\n")
    assert run_files.is_run_dir(tmp_path)
    assert not run_files.is_run_dir(tmp_path / run_files.CONFIG)


def test_train_and_verify_build_their_trainers_with_the_same_function(
        monkeypatch, tmp_path, one_thread):
    """``verify`` must prove the wiring users run: both go through one builder, and what it
    builds carries the guard (with attribution), the safe loss and the metrics writer."""
    from finitetune.guard.attribution import Attributor
    from finitetune.guard.bad_batches import BadSampleRecorder
    from finitetune.integrations.hf import trainer as wiring
    from finitetune.integrations.hf.callback import GuardCallback
    from finitetune.integrations.hf.checkpoint_callback import CheckpointCallback
    from finitetune.integrations.hf.metrics import MetricsCallback
    from finitetune.loss.causal import SafeCausalLMLoss

    built: list[tuple[str, object]] = []
    real = wiring.build_trainer

    def spy(*args, **kwargs):
        trainer, tracker = real(*args, **kwargs)
        built.append((str(args[1].output_dir), trainer))
        return trainer, tracker

    monkeypatch.setattr(wiring, "build_trainer", spy)
    from finitetune.cli.main import main
    from finitetune.settings.config import GuardConfig
    from finitetune.verify.harness import build_trainer as verify_build
    from finitetune.verify.harness import prepare_setup

    run = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--output-dir", str(run), "--max-steps", "2",
                 "--no-eval-before", "--eval-size", "4"]) == 0
    setup = prepare_setup("tiny", rows_needed=16)
    verify_build(setup, tmp_path / "verify", setup.take(16), 1, guard=GuardConfig())
    assert [d for d, _ in built] == [str(run), str(tmp_path / "verify")]
    for _, trainer in built:
        callbacks = trainer.callback_handler.callbacks
        assert {GuardCallback, CheckpointCallback, MetricsCallback} <= {
            type(cb) for cb in callbacks}
        guard_cb = next(cb for cb in callbacks if isinstance(cb, GuardCallback))
        assert isinstance(guard_cb.on_fault, BadSampleRecorder)  # bad samples remembered, then
        assert isinstance(guard_cb.on_fault.inner, Attributor)  # attribution
        assert isinstance(trainer.compute_loss_func, SafeCausalLMLoss)

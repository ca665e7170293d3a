"""A run that fails after it started keeps a coherent run directory: ``status.json`` says
failed, at which step and why; the report says FAILED and is never healthy; no ``final/`` from
a model that did not finish training. And the atomic writer never replaces what is not a file.
"""

from __future__ import annotations

import json
import os

import pytest

from finitetune.cli.main import main


def _data(tmp_path):
    from finitetune.builtin.tasks import tiny_task

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                            for r in tiny_task(48, seed=5)))
    return path


def _args(tmp_path, model, out, steps=3):
    return ["train", "--model", model, "--data", str(_data(tmp_path)), "--output-dir", str(out),
            "--max-steps", str(steps), "--eval-size", "8", "--lora-r", "0", "--logging-steps",
            "1", "--save-steps", "1", "--no-eval-before"]


@pytest.mark.parametrize("fail_at", [0, 2])
def test_a_run_that_fails_records_it_and_has_no_final(tmp_path, tiny_model_dir, monkeypatch,
                                                      capsys, one_thread, fail_at):
    """Fault: a callback raises RuntimeError before step ``fail_at + 1`` (0: before any step).
    Must hold: status failed at that step with the error; no final/; report FAILED, unhealthy;
    the run's settings and logged steps are kept."""
    from transformers import TrainerCallback

    import finitetune.integrations.hf.trainer as wiring

    class Fail(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == fail_at:
                raise RuntimeError(f"injected failure at step {fail_at}")

    build = wiring.build_trainer

    def failing_build(*a, **k):
        trainer, loss = build(*a, **k)
        trainer.add_callback(Fail())
        return trainer, loss

    monkeypatch.setattr(wiring, "build_trainer", failing_build)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure"):
        main(_args(tmp_path, tiny_model_dir, out))
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == fail_at
    assert status["error"] == f"RuntimeError: injected failure at step {fail_at}"
    assert not (out / "final").exists()
    assert (out / ".finitetune-run.json").is_file() and (out / "config.yaml").is_file()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] \
        if fail_at else []
    assert [m["step"] for m in metrics] == list(range(1, fail_at + 1))
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "unhealthy"
    titles = [f["title"] for f in report["findings"] if f["severity"] == "critical"]
    assert titles[0] == f"FAILED at step {fail_at}: RuntimeError: injected failure at step {fail_at}"
    capsys.readouterr()
    assert main(["report", str(out)]) == 1
    assert f"FAILED at step {fail_at}" in capsys.readouterr().out


def test_a_completed_run_says_so(tmp_path, tiny_model_dir, one_thread):
    out = tmp_path / "run"
    assert main(_args(tmp_path, tiny_model_dir, out, steps=2)) == 0
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["step"], status["error"]) == ("completed", 2, None)
    assert (out / "final" / "model.safetensors").is_file()
    marker = json.loads((out / ".finitetune-run.json").read_text())
    assert marker["created_by"] == "finitetune train"
    # --overwrite replaces a directory finitetune made (the marker says so) ...
    (out / "stale.txt").write_text("from the earlier run\n")
    assert main([*_args(tmp_path, tiny_model_dir, out, steps=1), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "status.json").read_text())["step"] == 1


def test_a_status_marked_running_is_a_warning_not_healthy(tmp_path):
    """A run whose process was killed leaves status "running": the report says it did not
    finish instead of calling it healthy."""
    from finitetune.report.health import health_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 2.0 / s, "grad_norm": 1.0 + s / 10}) + "\n"
        for s in range(1, 9)))
    (run / "status.json").write_text('{"state": "running", "step": 0, "error": null}\n')
    report = health_report(run)
    assert report.verdict == "warning"
    assert any("did not finish" in f.title for f in report.findings)
    (run / "status.json").write_text('{"state": "completed", "step": 8, "error": null}\n')
    assert health_report(run).verdict == "healthy"


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "dangling"])
def test_the_atomic_writer_never_replaces_what_is_not_a_regular_file(tmp_path, kind):
    from finitetune.errors import OutputError
    from finitetune.rundir.jsonio import write_text_atomic

    target = tmp_path / "target"
    other = tmp_path / "other.txt"
    other.write_text("keep\n")
    {"fifo": lambda: os.mkfifo(target), "symlink": lambda: os.symlink(other, target),
     "directory": target.mkdir, "dangling": lambda: os.symlink(tmp_path / "x", target)}[kind]()
    before = os.lstat(target)
    with pytest.raises(OutputError, match="not a regular file: refusing to replace it"):
        write_text_atomic(target, "new\n")
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert other.read_text() == "keep\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt", "target"]  # no temp left

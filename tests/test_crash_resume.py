"""SIGKILL `finitetune train` at deterministic points, `--resume`, compare with a run never killed.

Fault: the process is killed with SIGKILL (no cleanup runs) by the ``FINITETUNE_TEST_KILL``
hook at one point: mid-step before the first checkpoint, mid-step between checkpoints, in the
middle of a checkpoint save (weights written, optimizer.pt half-written), in the middle of a
metrics line, and right after the last checkpoint. What must hold after ``--resume``:
- final weights bit-identical (``torch.equal``) to the uninterrupted run with the same seed,
  for a decaying (cosine) and a constant learning rate;
- ``metrics.jsonl`` has every step exactly once; events are not duplicated;
- the half-written checkpoint is detected, reported, set aside; the torn line is reported;
- "killed after the last checkpoint" trains no extra step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finitetune.cli.main import main

STEPS = 6
pytestmark = pytest.mark.slow


def _data(tmp_path: Path) -> Path:
    from finitetune.builtin.tasks import tiny_task

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                            for r in tiny_task(40, seed=7)))
    return path


def _args(model: str, data: Path, out: Path, schedule: str) -> list[str]:
    return ["train", "--model", model, "--data", str(data), "--output-dir", str(out),
            "--max-steps", str(STEPS), "--save-steps", "2", "--logging-steps", "1",
            "--batch-size", "4", "--eval-size", "4", "--lora-r", "0", "--precision", "fp32",
            "--no-eval-before", "--lr-scheduler-type", schedule, "--save-total-limit", "2"]


@pytest.fixture(scope="module")
def baselines(tmp_path_factory, tiny_model_dir):
    """The uninterrupted runs, one per schedule (in-process)."""
    root = tmp_path_factory.mktemp("baseline")
    data = _data(root)
    out = {}
    for schedule in ("cosine", "constant"):
        run = root / schedule
        assert main(_args(tiny_model_dir, data, run, schedule)) == 0
        out[schedule] = (data, load_file(run / "final" / "model.safetensors"))
    return out


def _kill(args: list[str], point: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FINITETUNE_TEST_KILL": point, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "finitetune", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("point,schedule", [
    ("step:1", "cosine"),    # before the first checkpoint: starts again from step 0
    ("step:3", "constant"),  # mid-step, between checkpoints
    ("save:4", "cosine"),    # during the save of checkpoint-4
    ("log:5", "cosine"),     # mid-line in metrics.jsonl
    ("end", "constant"),     # after the last checkpoint: "trained 7 steps of 6" and, with a
                             # constant LR, different weights before the fix
])
def test_killed_anywhere_resumes_to_the_uninterrupted_weights(
        tmp_path, tiny_model_dir, baselines, capfd, caplog, point, schedule):
    data, expected = baselines[schedule]
    out = tmp_path / "run"
    args = _args(tiny_model_dir, data, out, schedule)
    killed = _kill(args, point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "final").exists()
    if point == "save:4":
        assert not (out / "checkpoint-4" / "trainer_state.json").exists()  # really half-written
    if point == "log:5":
        assert not (out / "metrics.jsonl").read_text().endswith("\n")  # a torn last line

    assert main([*args, "--resume"]) == 0
    captured = capfd.readouterr()
    got = load_file(out / "final" / "model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{point}/{schedule}: {key} differs"
    assert _steps(out / "metrics.jsonl") == list(range(1, STEPS + 1))
    assert json.loads((out / "eval.json").read_text())["global_step"] == STEPS
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["action"] for e in events] == ["resume"]  # one resume, nothing else, nothing twice
    resumed_from = {"step:1": None, "step:3": "checkpoint-2", "save:4": "checkpoint-2",
                    "log:5": "checkpoint-4", "end": "checkpoint-6"}[point]
    assert events[0]["checkpoint"] == resumed_from
    if point == "save:4":
        assert events[0]["skipped"][0]["checkpoint"] == "checkpoint-4"
        assert events[0]["skipped"][0]["health"] == "partial"
        assert (out / "partial-checkpoint-4").is_dir()
        assert "skipped checkpoint-4: partial" in caplog.text
    if point == "log:5":
        assert any("truncated last line" in note for note in events[0]["repaired"])
    if point == "end":  # not one step more, and said so plainly
        assert f"nothing left to train: checkpoint-{STEPS} is step {STEPS} of {STEPS}" in (
            captured.out) and "trained" not in captured.out.replace("nothing left to train", "")
    elif resumed_from is not None:
        assert f"trained steps {int(resumed_from.split('-')[1]) + 1}-{STEPS} " in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "healthy"

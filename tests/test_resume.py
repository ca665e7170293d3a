"""``--resume`` keeps the truth: a refused resume changes no byte of the run directory, a
setting that cannot be honoured is refused by name, and the settings that may change are
applied for real and recorded beside the first run's ``config.yaml``.

The finished run is trained once (a 20-step full fine-tune of the tiny model, checkpoints at
10 and 20); each test works on its own copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from finitetune.cli.main import main
from finitetune.rundir import files as run_files
from finitetune.testing.files import snapshot

pytestmark = pytest.mark.slow

COMMON = ["--logging-steps", "2", "--no-eval-before", "--eval-size", "8", "--lora-r", "0",
          "--precision", "fp32", "--batch-size", "8", "--save-steps", "10"]


def _data(root: Path) -> Path:
    from finitetune.builtin.tasks import tiny_task

    path = root / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                            for r in tiny_task(120, seed=3)))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """(data file, a completed 20-step run directory); copy it before changing anything."""
    root = tmp_path_factory.mktemp("finished")
    data = _data(root)
    run = root / "run"
    assert main(["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir",
                 str(run), "--max-steps", "20", *COMMON]) == 0
    assert run_files.read_status(run) == run_files.RunState.COMPLETED
    return data, run


def _copy(finished, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished[1], run, symlinks=True)
    return run


def _resume(run: Path, model: str, *flags: str) -> int:
    """``--resume`` with only the flags given: the rest comes from the run's own settings."""
    return main(["train", "--model", model, "--output-dir", str(run), "--resume", *flags])


def _torn(tmp_path: Path) -> Path:
    target = tmp_path / "elsewhere.jsonl"
    target.write_text('{"step": 1, "sample_ids": [1]}\n{"step": 2, "sam')
    return target


def _link(name: str):
    def make(run: Path, tmp_path: Path) -> None:
        target = tmp_path / f"target-{Path(name).name}"
        target.write_bytes((run / name).read_bytes() if (run / name).is_file() else b"")
        (run / name).unlink(missing_ok=True)
        os.symlink(target, run / name)
    return make


def _bad_samples_link(run: Path, tmp_path: Path) -> None:
    os.symlink(_torn(tmp_path), run / run_files.BAD_SAMPLES)


def _checkpoint_link(run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "ck10"
    shutil.move(run / "checkpoint-10", moved)
    os.symlink(moved, run / "checkpoint-10")


def _fifo(name: str):
    def make(run: Path, tmp_path: Path) -> None:
        (run / name).unlink(missing_ok=True)
        os.mkfifo(run / name)
    return make


def _edit_config(run: Path, tmp_path: Path) -> None:
    """config.yaml says LoRA, the checkpoints hold a full model (an edited record)."""
    text = (run / run_files.CONFIG).read_text().replace("lora_r: 0", "lora_r: 4")
    (run / run_files.CONFIG).write_text(text)


def _binary_metrics(run: Path, tmp_path: Path) -> None:
    with open(run / run_files.METRICS, "ab") as fh:
        fh.write(b"\xff\xfe\x00garbage\n")


def _nested_config(run: Path, tmp_path: Path) -> None:
    with open(run / run_files.CONFIG, "a") as fh:
        fh.write("guard:\n  policy: " + "[" * 10_000 + "\n")


REFUSED = {
    # what the run directory holds -> (flags, what the error says)
    "bad_samples_symlink": (_bad_samples_link, ["--max-steps", "30"],
                            "bad_samples.jsonl is a symbolic link"),
    "metrics_symlink": (_link(run_files.METRICS), ["--max-steps", "30"],
                        "metrics.jsonl is a symbolic link"),
    "status_symlink": (_link(run_files.STATUS), ["--max-steps", "30"],
                       "status.json is a symbolic link"),
    "report_symlink": (_link(run_files.REPORT_MD), ["--max-steps", "30"],
                       "report.md is a symbolic link"),
    "lock_symlink": (_link(run_files.RUN_LOCK), ["--max-steps", "30"],
                     ".finitetune-run.lock is a symbolic link"),
    "tokenizer_file_symlink": (_link("tokenizer/tokenizer.json"), ["--max-steps", "30"],
                               "tokenizer.json is a symbolic link"),
    "final_weights_symlink": (_link("final/model.safetensors"), ["--max-steps", "30"],
                              "model.safetensors is a symbolic link"),
    "checkpoint_symlink": (_checkpoint_link, ["--max-steps", "30"],
                           "checkpoint-10 is a symbolic link"),
    "events_fifo": (_fifo(run_files.EVENTS), ["--max-steps", "30"],
                    "events.jsonl is a FIFO"),
    "lora_on_a_full_fine_tune": (None, ["--max-steps", "30", "--lora-r", "4"],
                                 "--resume cannot honour lora_r = 4 (flag --lora-r), trained "
                                 "with 0"),
    "learning_rate": (None, ["--max-steps", "30", "--learning-rate", "0.5"],
                      "--resume cannot honour learning_rate = 0.5 (flag --learning-rate), "
                      "trained with 0.001"),
    "seed_and_batch": (None, ["--max-steps", "30", "--seed", "7", "--batch-size", "4"],
                       "per_device_train_batch_size = 4 (flag --batch-size), trained with 8"),
    "fewer_steps": (None, ["--max-steps", "10"],
                    "max_steps = 10: expected at least the 20 steps the run already "
                    "trained (checkpoint-20 is step 20; max_steps 10 means 10 steps)"),
    "nothing_to_add": (None, [], "the run completed all 20 steps; there is nothing to resume"),
    "edited_record": (_edit_config, ["--max-steps", "30"],
                      "lora_r = 4: expected the setting checkpoint-20 was trained with: it "
                      "holds a full model's weights"),
    "undecodable_log": (_binary_metrics, ["--max-steps", "30"], "metrics.jsonl"),
    "nested_record": (_nested_config, ["--max-steps", "30"],
                      "config.yaml:"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_refused_resume_changes_no_byte_of_the_run(finished, tmp_path, tiny_model_dir,
                                                     capsys, case):
    make, flags, message = REFUSED[case]
    run = _copy(finished, tmp_path)
    if make is not None:
        make(run, tmp_path)
    before = snapshot(run, tmp_path)
    code = _resume(run, tiny_model_dir, *flags)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert snapshot(run, tmp_path) == before  # every file's bytes, every name, link and mtime


def test_the_library_entry_point_refuses_the_same(finished, tmp_path, tiny_model_dir):
    from finitetune.errors import ConfigError
    from finitetune.train import train

    run = _copy(finished, tmp_path)
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"cannot honour learning_rate = 0\.5"):
        train(model=tiny_model_dir, output_dir=str(run), resume=True, max_steps=30,
              learning_rate=0.5)
    assert snapshot(run) == before


def test_overwrite_and_verify_refusals_change_nothing(finished, tmp_path, tiny_model_dir,
                                                      capsys):
    """Other refusal paths on an existing run: a verify that may not replace a training run,
    a new run that may not mix into it, an --overwrite while another process holds it."""
    from finitetune.rundir.paths import RunLock

    run = _copy(finished, tmp_path)
    before = snapshot(run)
    assert main(["verify", "--output-dir", str(run)]) == 2
    assert main(["train", "--model", tiny_model_dir, "--output-dir", str(run)]) == 2
    with RunLock(run, "another finitetune train"):
        held = snapshot(run)
        assert main(["train", "--model", tiny_model_dir, "--output-dir", str(run),
                     "--overwrite"]) == 2
        assert snapshot(run) == held
    err = capsys.readouterr().err
    assert "was not created by finitetune verify" in err and "holds an earlier run" in err
    assert "another finitetune train" in err
    before.pop(str(run / run_files.RUN_LOCK))  # taken by the test itself above
    after = snapshot(run)
    after.pop(str(run / run_files.RUN_LOCK))
    assert after == before


def _lr(run: Path) -> dict[int, float]:
    return {m["step"]: m["learning_rate"] for m in
            run_files.read_jsonl(run / run_files.METRICS).records}


def test_more_steps_extend_the_schedule_and_are_recorded_beside_config_yaml(
        finished, tmp_path, tiny_model_dir, capsys):
    data, _ = finished
    run = _copy(finished, tmp_path)
    first_config = (run / run_files.CONFIG).read_bytes()
    capsys.readouterr()
    assert _resume(run, tiny_model_dir, "--max-steps", "30", "--logging-steps", "5") == 0
    out = capsys.readouterr().out
    assert "trained steps 21-30 (10 steps, resumed from checkpoint-20)" in out
    assert "trained 20 steps" not in out and "trained 30 steps" not in out
    assert (run / run_files.CONFIG).read_bytes() == first_config  # repeats the first run
    record = yaml.safe_load((run / "config.resume-1.yaml").read_text())
    assert record == {"max_steps": 30, "logging_steps": 5}
    steps = [m["step"] for m in run_files.read_jsonl(run / run_files.METRICS).records]
    assert steps == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 25, 30]  # the new logging_steps
    event = [e for e in run_files.read_jsonl(run / run_files.EVENTS).records
             if e.get("kind") == "resume"][-1]
    assert event["settings_changed"] == {"max_steps": [20, 30], "logging_steps": [2, 5]}
    assert json.loads((run / run_files.EVAL).read_text())["global_step"] == 30

    # the learning rate after the resume is the one a 30-step run has at those steps
    fresh = tmp_path / "fresh"
    assert main(["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir",
                 str(fresh), "--max-steps", "30", *COMMON, "--logging-steps", "5"]) == 0
    resumed, reference = _lr(run), _lr(fresh)
    assert resumed[25] == pytest.approx(reference[25], rel=1e-9)
    assert resumed[30] == pytest.approx(reference[30], rel=1e-9)
    assert resumed[20] != pytest.approx(reference[20], rel=1e-3)  # steps 1-20: the old plan

    # the current settings are config.yaml + config.resume-1.yaml: 30 steps are done now
    capsys.readouterr()
    assert _resume(run, tiny_model_dir) == 2
    assert "completed all 30 steps" in capsys.readouterr().err
    assert _resume(run, tiny_model_dir, "--max-steps", "35") == 0
    assert yaml.safe_load((run / "config.resume-2.yaml").read_text()) == {"max_steps": 35}
    assert [m["step"] for m in run_files.read_jsonl(run / run_files.METRICS).records][-2:] == [
        30, 35]  # logging_steps 5 still: resume 1's change holds


def test_a_run_killed_at_its_last_checkpoint_says_nothing_was_trained(
        finished, tmp_path, tiny_model_dir, capsys):
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / run_files.FINAL_DIR)
    status = json.loads((run / run_files.STATUS).read_text())
    (run / run_files.STATUS).write_text(json.dumps({**status, "state": "running"}))
    capsys.readouterr()
    assert _resume(run, tiny_model_dir) == 0
    out = capsys.readouterr().out
    assert "nothing left to train: checkpoint-20 is step 20 of 20" in out
    assert "trained" not in out.replace("nothing left to train", "")
    assert (run / run_files.FINAL_DIR / "model.safetensors").is_file()
    assert not list(run.glob("config.resume-*.yaml"))  # no setting changed


def test_a_schedule_that_kept_the_old_total_stops_the_resumed_run():
    """The check behind "the schedule really extends": transformers rebuilds the schedule for
    the new total and restores only its position; were it to restore the old total, the
    resumed run stops instead of logging learning rates the recorded settings do not give."""
    import functools
    from types import SimpleNamespace

    from finitetune.errors import ConfigError
    from finitetune.train.resume_check import resumed_settings_callback

    def lr(step, num_warmup_steps, num_training_steps):
        return 1.0

    state = SimpleNamespace(max_steps=30, compute_steps=lambda args, n: None)
    ok = SimpleNamespace(lr_lambdas=[functools.partial(lr, num_warmup_steps=3,
                                                       num_training_steps=30)])
    stale = SimpleNamespace(lr_lambdas=[functools.partial(lr, num_warmup_steps=2,
                                                          num_training_steps=20)])
    callback = resumed_settings_callback()
    callback.on_train_begin(None, state, None, lr_scheduler=ok)
    with pytest.raises(ConfigError, match="ends at step 20, not at 30"):
        callback.on_train_begin(None, state, None, lr_scheduler=stale)

"""``finitetune run``: an unedited Trainer script, guarded from the outside.

The script below imports nothing from finitetune: every guard feature it gets comes through
``finitetune run``'s ``sitecustomize``. Each fault kind of ``--inject`` is put into it and the
events, metrics, exit code and printed report are checked; bad options exit 2 before anything
runs.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from finitetune.cli.main import main

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
    ids = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(output_dir=sys.argv[1], max_steps=int(sys.argv[2]),
                             per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
                             save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows).train()
    bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    print(f"nonfinite parameters: {bad}")
''')


def _run(tmp_path, options, steps=5, out="out"):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "finitetune", "run", *options, "--", sys.executable,
           str(script), str(tmp_path / out), str(steps)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_each_fault_kind_is_injected_and_handled(tmp_path):
    # Faults: inf_loss at step 2, empty_batch at step 4 (every label -100), with a YAML config
    # and --events-dir. Must: exit 0; step 2 skipped as a non-finite loss, step 4 as
    # no_valid_tokens; the events and metrics in --events-dir; the log's loss at step 4 is NaN
    # (not the Trainer's 0.0); the parameters finite; the report printed.
    (tmp_path / "guard.yaml").write_text("guard:\n  max_consecutive_skips: 3\n")
    r = _run(tmp_path, ["--inject", "inf_loss@2", "--inject", "empty_batch@4", "--config",
                        str(tmp_path / "guard.yaml"), "--events-dir", str(tmp_path / "ev")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(e["step"], e["reason"]) for e in _lines(tmp_path / "ev" / "events.jsonl")] == [
        (2, "nonfinite_loss"), (4, "no_valid_tokens")]
    metrics = {m["step"]: m for m in _lines(tmp_path / "ev" / "metrics.jsonl")}
    assert [metrics[s]["skipped"] for s in range(1, 6)] == [0, 1, 0, 1, 0]
    assert metrics[4]["loss"] is None and metrics[4]["loss_nonfinite"] == "nan"
    assert "nonfinite parameters: 0" in r.stdout and "# Training health report" in r.stdout
    assert "injected empty_batch@4, inf_loss@2" in r.stdout


@pytest.mark.slow
def test_a_halt_returns_exit_code_3(tmp_path):
    # Fault: NaN gradient at step 2 with --guard-policy halt. Must: the program stops with
    # NonFiniteHalt after step 2 (nothing applied there), finitetune run exits 3 and says so.
    # (--no-guard on the same fault: tests/test_trl_guard.py shows the NaN weights.)
    r = _run(tmp_path, ["--guard-policy", "halt", "--inject", "nan_grad@2", "--no-report"])
    assert r.returncode == 3, r.stderr[-3000:]
    assert "NonFiniteHalt" in r.stderr and "halted by the guard at step 2" in r.stdout
    assert [(e["step"], e["action"]) for e in _lines(tmp_path / "out" / "events.jsonl")] == [
        (2, "halt")]


# A release the guard cannot stand on: the program runs with an accelerate whose Accelerator has
# no clip_grad_norm_ (simulated before the Trainer is built).
NO_CLIP_SEAM = SCRIPT.replace("import sys\n", "import sys\nimport accelerate\n"
                              "del accelerate.Accelerator.clip_grad_norm_\n", 1)


@pytest.mark.slow
def test_a_refusing_guard_is_reported_as_the_guards_refusal(tmp_path):
    # Fault: a missing seam. Must: the Trainer is refused when it is built (no step trained,
    # no events), finitetune run says the guard refused it and why (not "nothing was
    # guarded"), and exits non-zero.
    script = tmp_path / "train.py"
    script.write_text(NO_CLIP_SEAM)
    cmd = [sys.executable, "-m", "finitetune", "run", "--", sys.executable, str(script),
           str(tmp_path / "out"), "3"]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert "finitetune run: the guard refused to train Trainer" in r.stderr
    assert "accelerate.Accelerator.clip_grad_norm_" in r.stderr
    assert "nothing was guarded" not in r.stderr + r.stdout
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# The program's own fault: its callback turns one weight +inf after optimizer step 3 (a bug
# finitetune does not see as a NaN gradient); it saves every 2 steps and keeps 1 checkpoint.
POISON = SCRIPT.replace('save_strategy="no"', 'save_strategy="steps", save_steps=2, '
                        'save_total_limit=1').replace(
    "Trainer(model=model, args=args, train_dataset=rows).train()", textwrap.dedent('''
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")

    Trainer(model=model, args=args, train_dataset=rows, callbacks=[Poison()]).train()
    '''))


@pytest.mark.slow
@pytest.mark.parametrize("guarded", [False, True])
def test_a_poisoned_state_never_reaches_a_checkpoint_of_a_program_run(tmp_path, guarded):
    # Must (guarded): the saves at steps 4 and 6 are refused (events name the pinned
    # checkpoint-2), rotation keeps checkpoint-2, no checkpoint holds a NaN/inf. The control
    # (--no-guard) shows the fault: the Trainer saves the poisoned state and deletes checkpoint-2.
    from finitetune.rundir import files as run_files
    from finitetune.rundir.checkpoints import scan_nonfinite

    script = tmp_path / "train.py"
    script.write_text(POISON)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "finitetune", "run", "--no-report",
           *([] if guarded else ["--no-guard"]), "--", sys.executable, str(script), str(out), "6"]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    kept = [p.name for p in run_files.checkpoints(out)]
    if not guarded:
        assert kept == ["checkpoint-6"] and scan_nonfinite(out / "checkpoint-6")
        return
    assert kept == ["checkpoint-2"]
    assert all(scan_nonfinite(p) == [] for p in out.glob("*checkpoint-*"))
    refused = [e for e in _lines(out / "events.jsonl") if e.get("action") == "save_refused"]
    assert [(e["step"], e["pinned"]) for e in refused] == [(4, "checkpoint-2"),
                                                           (6, "checkpoint-2")]


@pytest.mark.slow
def test_rollback_to_disk_restores_a_program_s_own_checkpoint(tmp_path):
    # Fault: NaN gradient at step 5; guard policy rollback with rollback_to: disk, the program
    # saving every 2 steps. Must: step 5 is rolled back to checkpoint-2 (the newest healthy one
    # older than the state that failed), restored from disk, and the run goes on to step 8.
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.replace('save_strategy="no"', 'save_strategy="steps", save_steps=2'))
    (tmp_path / "g.yaml").write_text("guard:\n  policy: rollback\n  rollback_to: disk\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "finitetune", "run", "--no-report", "--config",
           str(tmp_path / "g.yaml"), "--inject", "nan_grad@5", "--", sys.executable, str(script),
           str(out), "8"]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    events = _lines(out / "events.jsonl")
    assert [(e["step"], e["action"], e.get("checkpoint")) for e in events] == [
        (5, "restored", "checkpoint-2"), (5, "rollback", None)]
    assert max(m["step"] for m in _lines(out / "metrics.jsonl")) == 8


def test_a_program_without_a_trainer_keeps_its_exit_code(tmp_path, capsys):
    assert main(["run", "--", sys.executable, "-c", "raise SystemExit(7)"]) == 7
    err = capsys.readouterr().err
    assert "no transformers.Trainer that started training (it exited with code 7)" in err
    assert "nothing was guarded" in err
    # --no-guard (a control run): no guard to speak of, the program's code all the same
    assert main(["run", "--no-guard", "--", sys.executable, "-c", "raise SystemExit(7)"]) == 7
    err = capsys.readouterr().err
    assert "(it exited with code 7)." in err and "guarded" not in err


def test_the_environment_s_own_sitecustomize_still_runs(tmp_path, capsys):
    # Must: finitetune's sitecustomize shadows another on PYTHONPATH; that one still runs.
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['THEIRS'] = 'ran'\n")
    marker = tmp_path / "marker.txt"
    code = f"import os; open({str(marker)!r}, 'w').write(os.environ.get('THEIRS', 'no'))"
    env_before = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env_before) if p)
    try:
        assert main(["run", "--", sys.executable, "-c", code]) == 0
    finally:
        os.environ["PYTHONPATH"] = env_before
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("argv, message", [
    (["run", "--inject", "nan@x", "--", "python"], "expected KIND@STEP"),
    (["run", "--inject", "nan_grad@0", "--", "python"], "STEP >= 1"),
    (["run", "--max-consecutive-skips", "-1", "--", "python"], "max_consecutive_skips"),
    (["run", "--"], "give the program to run after --"),
    (["run", "--", "no-such-program-finitetune"], "cannot start 'no-such-program-finitetune'"),
])
def test_bad_options_exit_2_before_anything_runs(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_config_keys_are_named(tmp_path, capsys):
    (tmp_path / "g.yaml").write_text("polcy: skip\n")
    assert main(["run", "--config", str(tmp_path / "g.yaml"), "--", "python"]) == 2
    err = capsys.readouterr().err
    assert "unknown setting 'polcy'" in err and "g.yaml:1" in err and "did you mean 'policy'" in err


def test_run_reads_its_config_as_train_does(tmp_path, capsys):
    """One settings reader: `1e-4` is a number in `finitetune run --config` as in `train`
    (PyYAML alone reads it as the string "1e-4"), a guard section is found where `train`
    keeps it, and a bad value names its file and line."""
    import argparse

    from finitetune.cli.run import guard_config

    good = tmp_path / "train.yaml"
    good.write_text("model: tiny\nguard:\n  max_grad_norm: 1e-4\n  policy: halt\n")
    cfg = guard_config(argparse.Namespace(config=str(good), guard_policy=None,
                                          max_consecutive_skips=None))
    assert cfg.max_grad_norm == 1e-4 and isinstance(cfg.max_grad_norm, float)
    assert cfg.policy == "halt"
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: skip\nmax_grad_norm: -1\n")
    assert main(["run", "--config", str(bad), "--", "python"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


WAITING = SCRIPT.replace("Trainer(model=model, args=args, train_dataset=rows).train()", '''
import os, pathlib, time
trainer = Trainer(model=model, args=args, train_dataset=rows)  # the directory is locked here
if len(sys.argv) > 3:  # the first program: hold the directory until the test says go
    pathlib.Path(sys.argv[3] + ".ready").write_text(str(os.getpid()))
    while not pathlib.Path(sys.argv[3] + ".go").exists():
        time.sleep(0.05)
trainer.train()''')


@pytest.mark.slow
def test_a_second_program_on_a_trainer_s_output_dir_is_refused_naming_the_first(tmp_path):
    """Two `finitetune run` on one output_dir. The first holds it from its Trainer's
    construction to its end; the second is refused there (exit 2, the holder named), writes
    nothing into the directory, and the first's metrics have every step exactly once."""
    from finitetune.testing.files import snapshot

    script = tmp_path / "train.py"
    script.write_text(WAITING)
    out, flag = tmp_path / "out", tmp_path / "flag"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "finitetune", "run", "--no-report", "--", sys.executable,
            str(script), str(out), "6"]
    first = subprocess.Popen([*base, str(flag)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # the first program has built its Trainer (no clock asserted)
            if (tmp_path / "flag.ready").exists() or first.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"])
        assert (tmp_path / "flag.ready").exists(), first.communicate()[1][-3000:]
        holder = (tmp_path / "flag.ready").read_text()
        before = snapshot(out)
        second = subprocess.run(base, env=env, capture_output=True, text=True, timeout=300)
        assert snapshot(out) == before  # nothing of the second program went into it
        (tmp_path / "flag.go").write_text("")
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"{out} is in use: finitetune run (" in second.stderr
    assert second.stderr.count(f"{out} is in use") == 1  # said once, by finitetune run
    assert f"pid {holder} on" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, err[-3000:]
    steps = [m["step"] for m in _lines(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    # once the first has ended, the directory is free again
    third = subprocess.run(base, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]

"""A run directory another process is writing is never resumed, replaced or reused (RunLock).

Fault: a second ``finitetune train --resume`` or ``--overwrite`` (or a second ``verify``) on the
output directory of a run that is still going. Before the lock, ``--resume`` trimmed the live
run's ``metrics.jsonl`` under it and trained a second copy into the same folder, and
``--overwrite`` deleted the folder of the running job. What must hold: exit 2 with a message
naming the running command and its pid, the live run's files untouched; and once that run is
killed with SIGKILL (no clean-up at all) the directory is free again: there is no stale lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finitetune.cli.main import main
from finitetune.errors import OutputError
from finitetune.rundir import files as run_files
from finitetune.rundir.files import lock_holder
from finitetune.rundir.paths import RunLock, check_output_dir, prepare_output_dir

HOLD = """
import sys, time
from finitetune.rundir.paths import RunLock
with RunLock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(path: Path, command: str) -> subprocess.Popen:
    """Another process holding ``path``'s lock, as a running ``command`` would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), command],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.stdout is not None:
        proc.stdout.close()


def test_a_held_directory_is_refused_for_resume_replace_and_reuse(tmp_path):
    run = prepare_output_dir(tmp_path / "run", "--output-dir", "finitetune train")
    with RunLock(run, "finitetune train"):
        holder = lock_holder(run)
        assert holder is not None and f"finitetune train, pid {os.getpid()}" in holder
        for kwargs in ({"resume": True}, {"replace": True}, {}):
            with pytest.raises(OutputError, match="is in use: finitetune train, pid"):
                check_output_dir(run, **kwargs)
        with pytest.raises(OutputError, match="Wait for that run to end"), RunLock(
                run, "finitetune train"):
            pass
    assert lock_holder(run) is None  # released at the end of the block
    check_output_dir(run, replace=True)  # free again
    with RunLock(run, "finitetune train"):  # and can be taken again
        pass


def test_sigkill_leaves_no_stale_lock_and_verify_is_refused_meanwhile(tmp_path, capsys):
    out = prepare_output_dir(tmp_path / "verify-out", "--output-dir", "finitetune verify")
    (out / "verify.json").write_text("{}\n")
    proc = _holder(out, "finitetune verify")
    try:
        assert f"pid {proc.pid}" in (lock_holder(out) or "")
        code = main(["verify", "--model", "tiny", "--output-dir", str(out)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"is in use: finitetune verify, pid {proc.pid}" in err and "Traceback" not in err
        assert (out / "verify.json").read_text() == "{}\n"  # not replaced
    finally:
        _kill(proc)
    assert lock_holder(out) is None  # the kernel dropped the killed holder's lock
    assert (out / run_files.RUN_LOCK).is_file()  # the file stays; only the lock counts
    check_output_dir(out, created_by="finitetune verify", replace=True)


@pytest.mark.slow
def test_second_train_on_a_live_run_stops_and_leaves_it_alone(tmp_path, tiny_model_dir, capsys):
    from finitetune.builtin.tasks import tiny_task

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]})
                            + "\n" for r in tiny_task(40, seed=7)))
    out = tmp_path / "run"
    base = ["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir", str(out),
            "--batch-size", "4", "--eval-size", "4", "--lora-r", "0", "--precision", "fp32",
            "--no-eval-before", "--logging-steps", "1", "--save-steps", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    live = subprocess.Popen([sys.executable, "-m", "finitetune", *base, "--max-steps", "100000"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (out / run_files.METRICS).is_file() or not run_files.checkpoints(out):
            assert live.poll() is None, "the live run ended early"
            assert time.monotonic() < deadline, "the live run did not start training"
            time.sleep(0.2)
        assert f"finitetune train, pid {live.pid}" in (lock_holder(out) or "")
        config = (out / run_files.CONFIG).read_text()
        for flag in ("--resume", "--overwrite"):
            logged = len((out / run_files.METRICS).read_text().splitlines())
            code = main([*base, "--max-steps", "10", flag])
            err = capsys.readouterr().err
            assert code == 2, err
            assert f"is in use: finitetune train, pid {live.pid}" in err, err
            assert "Traceback" not in err
            # the live run's files are as it left them: nothing trimmed, nothing deleted
            assert (out / run_files.CONFIG).read_text() == config
            assert len((out / run_files.METRICS).read_text().splitlines()) >= logged
        assert live.poll() is None  # still training
    finally:
        _kill(live)
    assert lock_holder(out) is None
    check_output_dir(out, resume=True)  # the killed run can now be resumed


def _unfinished_run(path: Path) -> Path:
    """A run directory as a run leaves it mid-training: steps logged, status "running"."""
    run = prepare_output_dir(path, "--output-dir", "finitetune train")
    (run / run_files.METRICS).write_text("".join(
        json.dumps({"step": s, "loss": 3.0 / s, "grad_norm": 1.0, "learning_rate": 1e-3}) + "\n"
        for s in range(1, 21)))
    (run / run_files.STATUS).write_text(json.dumps({"state": "running", "step": 0}))
    return run


def test_the_report_tells_a_live_run_from_a_killed_one(tmp_path):
    from finitetune.report import health_report

    run = _unfinished_run(tmp_path / "run")
    proc = _holder(run, "finitetune train")
    try:
        live = {f.rule: f for f in health_report(run).findings}
        assert "run_unfinished" not in live
        assert f"finitetune train, pid {proc.pid}" in live["run_in_progress"].detail
    finally:
        _kill(proc)
    killed = {f.rule: f for f in health_report(run).findings}
    assert "run_in_progress" not in killed
    assert "killed" in killed["run_unfinished"].detail


def test_watch_ends_when_the_runs_process_is_killed(tmp_path, capsys):
    """Before the lock, `finitetune watch` waited for a report.json a killed run never writes."""
    from finitetune.report.follow import Follower

    run = _unfinished_run(tmp_path / "run")
    proc = _holder(run, "finitetune train")
    try:
        follower = Follower(run)
        follower.poll()
        assert len(follower.log.records) == 20
        assert not follower.ended()  # its writer is alive
        follower.close()
    finally:
        _kill(proc)
    start = time.monotonic()
    code = main(["watch", str(run), "--plain", "--interval", "0.05", "--idle-exit", "30"])
    out = capsys.readouterr().out
    assert time.monotonic() - start < 15, "watch waited for the idle timeout, not the death"
    assert code == 0, out  # a warning, as `finitetune report` gives it
    assert "did not finish" in out, out


def test_a_file_system_without_locks_warns_and_does_not_stop_the_run(tmp_path, monkeypatch,
                                                                      caplog):
    import errno

    from finitetune.rundir import paths as output_paths

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    run = prepare_output_dir(tmp_path / "run", "--output-dir", "finitetune train")
    monkeypatch.setattr(output_paths.fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="finitetune"), RunLock(run, "finitetune train"):
        pass
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text


def test_a_copied_run_directory_is_not_called_killed(tmp_path):
    """A run directory rsync'ed from the node where it trains carries a lock file that nobody
    holds here: the report must not call that run killed, and watch must keep waiting."""
    from finitetune.report import health_report
    from finitetune.report.follow import Follower

    run = _unfinished_run(tmp_path / "run")
    (run / run_files.RUN_LOCK).write_text(json.dumps(
        {"command": "finitetune train", "pid": 4242, "host": "gpu-node-17", "since": "x"}))
    assert lock_holder(run) is None and not run_files.writer_gone(run)
    finding = {f.rule: f for f in health_report(run).findings}["run_unfinished"]
    assert "cannot tell" in finding.detail and "killed (SIGKILL" not in finding.detail
    follower = Follower(run)
    follower.poll()
    assert not follower.ended()
    follower.close()


def test_verify_holds_its_output_directory_while_it_writes(tmp_path, monkeypatch):
    """`verify --output-dir` takes the lock once the directory is made and lets it go at the
    end, also when a scenario fails (the first arm is stopped here on purpose)."""
    import io

    from finitetune.verify import harness, run_verify

    out = tmp_path / "v"
    seen = []

    class Stop(Exception):
        pass

    def first_arm(*args, **kwargs):
        seen.append(lock_holder(out))
        raise Stop

    monkeypatch.setattr(harness, "run_arm", first_arm)
    with pytest.raises(Stop):
        run_verify("tiny", steps=5, output_dir=str(out), out=io.StringIO())
    assert seen and f"finitetune verify, pid {os.getpid()}" in (seen[0] or "")
    assert lock_holder(out) is None

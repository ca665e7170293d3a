"""`finitetune watch`: follows a growing log incrementally and exits as soon as it turns.

The exit test runs the real CLI on a file another process appends to. It does not race the
clock (a loaded CI machine can stall any process for seconds): the writer appends one
hidden-NaN line and then writes nothing more, so the watcher can only exit because of that line,
and its message says which entry it judged.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import pytest

from finitetune.cli.main import main
from finitetune.report.follow import Follower, TailFile
from finitetune.rundir.jsonio import append_jsonl

WRITER = r"""
import sys, time, math
path, n_ok = sys.argv[1], int(sys.argv[2])
with open(path, "a") as fh:
    for i in range(n_ok):
        fh.write(str({"loss": 2.0 - 0.01 * i, "grad_norm": 1.0 + 0.01 * (i % 5),
                      "learning_rate": 1e-4, "epoch": i / 100}) + "\n")
        fh.flush()
        time.sleep(0.02)
    fh.write(str({"loss": 0.0, "grad_norm": math.nan, "learning_rate": 1e-4,
                  "epoch": 0.5}) + "\n")
    fh.flush()
time.sleep(600)  # nothing more: the watcher must act on the line above alone
"""


def _dict_line(i: int, loss: float | None = None, grad: float = 1.0) -> str:
    loss = 2.0 - 0.01 * i if loss is None else loss
    return str({"loss": loss, "grad_norm": grad + 0.01 * (i % 5), "learning_rate": 1e-4,
                "epoch": i / 100}) + "\n"


@pytest.mark.slow
def test_exit_on_unhealthy_at_the_first_hidden_nan_line(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("".join(_dict_line(i) for i in range(10)))
    with subprocess.Popen([sys.executable, "-m", "finitetune", "watch", str(log), "--exit-on",
                           "unhealthy", "--idle-exit", "300"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as watch:
        try:
            first = watch.stdout.readline()  # the watcher is up and has judged the start
            assert first.rstrip().endswith("step 10: healthy"), first
            with subprocess.Popen([sys.executable, "-c", WRITER, str(log), "20"]) as writer:
                try:
                    code = watch.wait(timeout=120)  # a hang fails; no latency is asserted
                finally:
                    writer.kill()
            rest = watch.stdout.read()
        finally:
            if watch.poll() is None:
                watch.kill()
    assert code == 1
    # judged on entry 31 (10 + 20 healthy, then the one NaN line), and nothing came after it
    assert "healthy -> unhealthy: Hidden NaN loss: loss exactly 0.0 on 1 of 31 entries" in rest


def test_tail_reads_only_new_bytes_and_survives_truncation_and_rotation(tmp_path):
    path = tmp_path / "a.log"
    path.write_bytes(b"x" * 5_000_000 + b"\nfirst\n")
    tail = TailFile(path)
    assert tail.read_lines()[-1] == b"first" and tail.bytes_read == 5_000_007
    with open(path, "ab") as fh:
        fh.write(b"second\npart")
    assert tail.read_lines() == [b"second"] and tail.bytes_read == 5_000_018  # 11 new bytes
    with open(path, "ab") as fh:
        fh.write(b"ial\n")
    assert tail.read_lines() == [b"partial"]
    path.write_bytes(b"new\n")  # truncated in place and rewritten
    assert tail.read_lines() == [b"new"] and "truncated" in tail.notes[-1]
    with open(path, "ab") as fh:
        fh.write(b"old tail\n")
    path.rename(tmp_path / "a.log.1")  # rotated: the old file is finished first
    path.write_bytes(b"fresh\n")
    assert tail.read_lines() == [b"old tail", b"fresh"] and "rotated" in tail.notes[-1]
    tail.close()


def test_follower_of_a_run_dir_reads_metrics_events_and_eval_as_they_come(tmp_path):
    run = tmp_path / "run"
    follower = Follower(run)
    assert follower.poll() == (0, False)  # not there yet: wait for it
    run.mkdir()
    for i in range(1, 4):
        append_jsonl(run / "metrics.jsonl", {"step": i, "loss": 2.0 - 0.1 * i, "grad_norm": 1.0})
    assert follower.poll() == (3, False)
    append_jsonl(run / "metrics.jsonl", {"step": 4, "loss": None, "loss_nonfinite": "nan",
                                         "grad_norm": 1.0})
    append_jsonl(run / "events.jsonl", {"step": 4, "kind": "guard", "action": "skip",
                                        "reason": "nonfinite_loss"})
    added, alarm = follower.poll()
    assert (added, alarm) == (2, True)
    assert math.isnan(follower.log.records[-1]["loss"]) and follower.log.events[0]["step"] == 4
    (run / "eval.json").write_text(json.dumps({"after": {"exact_match": 0.9}}))
    follower.poll()
    assert follower.log.eval == {"after": {"exact_match": 0.9}} and not follower.ended()
    (run / "report.json").write_text("{}")
    assert follower.ended()
    follower.close()


def test_watch_of_a_finished_run_dir_exits_with_its_verdict(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for i in range(1, 6):
        append_jsonl(run / "metrics.jsonl", {"step": i, "loss": 3.0 - 0.3 * i,
                                             "grad_norm": 1.0 + 0.1 * i})
    (run / "report.json").write_text("{}")
    assert main(["watch", str(run), "--interval", "0.05"]) == 0
    assert capsys.readouterr().out.strip().endswith("step 5: healthy")
    append_jsonl(run / "metrics.jsonl", {"step": 6, "loss": math.inf, "grad_norm": 1.0})
    for i in range(7, 10):
        append_jsonl(run / "metrics.jsonl", {"step": i, "loss": math.nan, "grad_norm": 1.0})
    assert main(["watch", str(run), "--interval", "0.05"]) == 1


def test_watch_follows_tensorboard_events_incrementally(tmp_path):
    pytest.importorskip("tensorboard", reason="the `logs` extra (tensorboard) is not installed")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "runs" / "a"))
    for s in range(1, 4):
        writer.add_scalar("train/loss", 2.0 - 0.1 * s, s)
        writer.add_scalar("train/grad_norm", 1.0, s)
    writer.flush()
    follower = Follower(tmp_path)
    assert follower.poll()[0] == 3
    writer.add_scalar("train/loss", 0.0, 4)
    writer.add_scalar("train/grad_norm", math.nan, 4)
    writer.flush()
    assert follower.poll() == (1, True)
    assert [r["step"] for r in follower.log.records] == [1, 2, 3, 4]
    writer.close()
    follower.close()


def test_live_panel_shows_counts_sparklines_verdict_and_events():
    from rich.console import Console

    from finitetune.report import health_report
    from finitetune.report.live import panel, sparkline

    assert sparkline([1.0, 2.0, None, math.nan, 3.0]) == "▁▄×█"
    text = "".join(_dict_line(i) for i in range(12)) + _dict_line(12, 0.0, math.nan)
    r = health_report(text)
    console = Console(record=True, width=140, color_system=None)
    console.print(panel(r, "train.log", [{"step": 13, "kind": "save_refused", "reason": "NaN"}]))
    out = console.export_text()
    assert "UNHEALTHY" in out and "13 entries, last step 13" in out
    assert re.search(r"eval_loss +not logged", out) and "×" in out and "▁" in out
    assert "[critical] Hidden NaN loss" in out and "events: step 13 save_refused (NaN)" in out


def test_watch_rejects_bad_settings_and_waits_for_a_missing_path(tmp_path):
    assert main(["watch", str(tmp_path / "x.log"), "--interval", "0"]) == 2
    start = time.monotonic()
    assert main(["watch", str(tmp_path / "none.log"), "--idle-exit", "0.3",
                 "--interval", "0.05"]) == 0
    assert time.monotonic() - start < 5

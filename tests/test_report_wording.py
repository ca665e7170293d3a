"""Strict wording: a finding says only what the log shows.

Each test writes the log lines of one situation the old wording got wrong and checks the
exact claims of the finding (and that the wrong claim is gone).
"""

from __future__ import annotations

import json
import math

from finitetune import health_report
from finitetune.report import to_markdown
from finitetune.report.render import trend_text
from finitetune.rundir.jsonio import append_jsonl

NAN = math.nan


def _lines(rows) -> str:
    return "\n".join(str(r) for r in rows) + "\n"


def _titles(r) -> dict[str, str]:
    return {f.rule: f.title for f in r.findings}


def test_absent_grad_norm_is_not_logged_never_finite():
    r = health_report(_lines([{"loss": 0.0, "learning_rate": 1e-4, "epoch": i / 10}
                              for i in range(5)]))
    title = _titles(r)["zero_loss"]
    assert "grad norm not logged" in title and "finite" not in title
    assert "Gradient norms\n\nNot logged." in to_markdown(r)
    with_norms = health_report(_lines([{"loss": 0.0, "grad_norm": 0.5} for _ in range(5)]))
    assert "with finite grad norms" in _titles(with_norms)["zero_loss"]


def test_one_nan_grad_norm_on_the_last_line_is_not_persistent():
    rows = [{"loss": 2.0 - 0.1 * i, "grad_norm": 1.0} for i in range(9)]
    r = health_report(_lines([*rows, {"loss": 1.0, "grad_norm": NAN}]))
    (f,) = [f for f in r.findings if f.rule == "nonfinite_grad"]
    assert f.severity == "warning" and r.verdict == "warning"
    assert "Persistent" not in f.title and "not called persistent" in f.title
    assert "the last entry (of 10)" in f.title
    # three in a row through the end: persistent
    r = health_report(_lines([*rows[:7], *[{"loss": 1.0, "grad_norm": NAN}] * 3]))
    assert r.verdict == "unhealthy"
    assert _titles(r)["nonfinite_grad"].startswith("Persistent non-finite grad norm")
    assert "the last 3 in a row" in _titles(r)["nonfinite_grad"]


def test_the_onset_of_a_nan_that_never_ends_is_named_as_onset_not_calibration():
    rows = [{"loss": 2.5 - 0.05 * i, "grad_norm": 1.2, "step": i + 1} for i in range(30)]
    rows.append({"loss": 1.9, "grad_norm": NAN, "step": 31})  # the onset: loss still finite
    rows += [{"loss": 0.0, "grad_norm": NAN, "step": s} for s in range(32, 60)]
    rows[0]["grad_norm"] = NAN  # and one early skip, which alone would look like calibration
    r = health_report(_lines(rows))
    titles = _titles(r)
    assert "calibration" not in json.dumps(titles)
    assert titles["nonfinite_grad"].startswith("Grad norm NaN/inf from step 31 through the last")
    assert "the onset, with the loss still finite (1.9)" in titles["nonfinite_grad"]
    assert titles["hidden_nan_loss"].startswith("Hidden NaN loss: loss exactly 0.0 on 28 of 59")
    assert r.verdict == "unhealthy"
    # a few early skips and then finite norms to the end: that is calibration
    early = [{"loss": 2.5 - 0.05 * i, "grad_norm": NAN if i < 2 else 1.2 + 0.01 * (i % 3)}
             for i in range(30)]
    r = health_report(_lines(early))
    assert _titles(r)["loss_scale_calibration"].startswith(
        "Non-finite grad norm with a finite loss early on only, finite afterwards")
    assert r.verdict == "healthy"


def test_rising_flat_and_falling_are_each_named_with_their_own_rule():
    norms = [1.0] * 12
    rising = health_report(_lines([{"loss": 1.0 + 0.2 * i, "grad_norm": g}
                                   for i, g in enumerate(norms)]))
    assert rising.trend.direction == "increasing"
    assert _titles(rising)["loss_not_decreasing"].startswith("Loss is rising, not decreasing")
    text = trend_text(rising)
    assert text.startswith("Trend: rising.") and "(rising: the interval lies above 0" in text
    noisy = health_report(_lines([{"loss": 2.0 + 0.01 * (-1) ** i, "grad_norm": 1.0}
                                  for i in range(12)]))
    text = trend_text(noisy)
    assert noisy.trend.direction == "none" and noisy.trend.evidence == "none"
    assert text.startswith("Trend: no significant trend over 12 points")
    assert "includes 0" in text and "decreasing:" not in text and "strong" not in text
    assert _titles(noisy)["loss_not_decreasing"].startswith(
        "Loss shows no significant trend over 12 points")
    assert noisy.learns is None  # no trend found is not "does not learn"
    flat = health_report(_lines([{"loss": 2.0 - 0.0001 * i, "grad_norm": 1.0}
                                 for i in range(12)]))  # falls, significantly, by 0.05 %
    text = trend_text(flat)
    assert flat.trend.direction == "flat" and text.startswith("Trend: flat.")
    assert "the fitted change is under 1 % of the median loss" in text
    assert _titles(flat)["loss_not_decreasing"].startswith("Loss is flat, not decreasing")
    falling = health_report(_lines([{"loss": 3.0 - 0.2 * i, "grad_norm": 1.0 + 0.01 * (i % 3)}
                                    for i in range(12)]))
    text = trend_text(falling)
    assert text.startswith("Trend: decreasing.") and "(decreasing: the interval lies below" in text
    assert falling.verdict == "healthy"


def test_a_loss_that_is_flat_then_climbs_at_the_end_is_called_rising():
    losses = [2.0 + 0.01 * (-1) ** i for i in range(30)] + [2.3, 2.8, 3.5, 4.4, 5.6, 7.0, 9.1,
                                                            11.8]
    r = health_report(_lines([{"loss": v, "grad_norm": 1.0} for v in losses]))
    title = _titles(r)["loss_rising_late"]
    assert title.startswith("Loss rising over the last 9 entries: from 1.99 at step 30")
    assert "to 11.8 at step 38" in title
    assert "Over the last 9 points it is rising" in trend_text(r)


def test_eval_loss_nan_joins_the_hidden_nan_evidence():
    rows = [{"loss": 2.0, "learning_rate": 1e-4, "epoch": 0.1},
            *[{"loss": 0.0, "learning_rate": 1e-4, "epoch": 0.1 * i} for i in range(2, 8)],
            {"eval_loss": NAN, "eval_runtime": 1.0, "epoch": 0.8}]
    r = health_report(_lines(rows))
    title = _titles(r)["hidden_nan_loss"]
    assert title == ("Hidden NaN loss: loss exactly 0.0 on 6 of 7 entries, the last 6 in a row, "
                     "with eval_loss NaN/inf on 1 evaluation(s)")
    assert r.verdict == "unhealthy" and "zero_loss" not in _titles(r)


def test_integers_are_shown_as_integers(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for i in range(1, 5):
        append_jsonl(run / "metrics.jsonl", {"step": i, "loss": 2.0 - 0.1 * i, "grad_norm": 1.0,
                                             "empty_microbatches": 1, "guard/skips": i - 1,
                                             "skipped": 0})
    append_jsonl(run / "events.jsonl", {"step": 3, "kind": "save_refused",
                                        "reason": "non-finite weights"})
    evals = "\n".join(str(d) for d in [{"eval_loss": 1.5, "eval_num_tokens": 5734.0}])
    md = to_markdown(health_report(run))
    assert "empty micro-batches (summed over entries): 4" in md
    assert "guard/skips (last value): 3" in md and "save_refused: 1" in md
    assert "0.0000" not in md.split("## Guard and events")[1].split("##")[0]
    r = health_report(evals + "\n" + _lines([{"loss": 1.0, "grad_norm": 1.0}]))
    row = next(line for line in to_markdown(r).splitlines() if "| eval_num_tokens |" in line)
    assert "| 5734–5734 |" in row and row.endswith("| 5734 |")


def test_cut_off_trainer_state_is_salvaged_with_a_note(tmp_path):
    state = {"global_step": 6, "log_history": [
        {"epoch": 0.1 * i, "grad_norm": 1.5 - 0.1 * i, "learning_rate": 1e-4,
         "loss": 2.5 - 0.1 * i, "step": i} for i in range(1, 7)], "max_steps": 6}
    text = json.dumps(state, indent=2)
    cut = text[: text.index('"step": 6')]  # cut mid-object, as pasted into an issue
    path = tmp_path / "trainer_state.json"
    path.write_text(cut)
    r = health_report(path)
    assert r.kind == "trainer_state" and r.series["step"] == [1, 2, 3, 4, 5]
    assert r.notes[0].startswith("salvaged 5 log entries from JSON that does not parse as a "
                                 "whole")
    assert "the readable part ends at line" in r.notes[0]
    middle = text[text.index("{\n      \"epoch\": 0.2"): text.index('"step": 5')]
    r = health_report(middle)  # the middle of log_history, pasted as text
    assert r.series["step"] == [2, 3, 4] and r.notes[0].startswith("salvaged 3 log entries")

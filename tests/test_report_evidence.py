"""Verdicts with evidence: the crafted logs an adversarial user wrote, each with the exact
verdict, exit code and finding it must get.

- a loss that explodes at its end, or spikes once, is never HEALTHY;
- a log that shows no problem and no learning (few entries, a loss under another name that
  turns NaN, noise) is INCONCLUSIVE, or worse, never HEALTHY;
- a loss that decays to a rounded 0.0 with finite, shrinking gradients is at most a warning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finitetune import health_report
from finitetune.cli.main import main
from finitetune.report.render import to_markdown, trend_text

NAN = float("nan")


def _console(tmp_path: Path, rows: list[dict], name: str = "train.log") -> Path:
    """The lines as the Trainer prints them (``str(dict)``)."""
    path = tmp_path / name
    path.write_text("".join(str(r) + "\n" for r in rows))
    return path


def _codes(path: Path) -> tuple[int, int]:
    """(exit code, exit code with --strict) of the real CLI."""
    return (main(["report", str(path), "-o", str(path.parent / "r.md")]),
            main(["report", str(path), "--strict", "-o", str(path.parent / "r.md")]))


def _rules(report) -> dict[str, str]:
    return {f.rule: f.severity for f in report.findings}


def _steady(n: int, level: float = 2.0) -> list[dict]:
    return [{"loss": level - 0.005 * i, "grad_norm": 1.0 + 0.01 * (i % 3),
             "learning_rate": 1e-4, "epoch": i / 100} for i in range(n)]


# ------------------------------------------------------------------ the loss explodes --
@pytest.mark.parametrize("last", [50.0, 1e6, 1e20, 1e30])
def test_a_loss_that_explodes_at_its_end_is_unhealthy(tmp_path, last):
    rows = [*_steady(40), {"loss": last, "grad_norm": 1.0, "learning_rate": 1e-4,
                           "epoch": 0.4}]
    path = _console(tmp_path, rows)
    r = health_report(path)
    assert r.verdict == "unhealthy" and r.learns is False
    assert _rules(r)["last_loss_high"] == "critical"
    title = next(f.title for f in r.findings if f.rule == "last_loss_high")
    assert title.startswith(f"Last loss {last:.4g} (step 41) is ")
    assert "x the median 1.9" in title
    assert "loss_spikes" not in _rules(r)  # the last entry is the last-loss rule's alone
    assert _codes(path) == (1, 1)
    md = to_markdown(r)
    assert "Model learns: no" in md and "Verdict: UNHEALTHY" in md
    assert "goes against that direction" in trend_text(r)  # "decreasing ... 2 -> 1e30" named


def test_a_last_loss_a_few_times_the_level_is_a_warning_and_a_normal_end_is_nothing(tmp_path):
    r = health_report(_console(tmp_path, [*_steady(30), {"loss": 9.0, "grad_norm": 1.0}]))
    assert _rules(r) == {"last_loss_high": "warning"} and r.verdict == "warning"
    r = health_report(_console(tmp_path, [*_steady(30), {"loss": 2.2, "grad_norm": 1.0}]))
    assert "last_loss_high" not in _rules(r)


def test_a_single_huge_loss_mid_run_is_a_spike_warning(tmp_path):
    rows = _steady(40)
    rows[24]["loss"] = 1e30  # step 25
    path = _console(tmp_path, rows)
    r = health_report(path)
    assert _rules(r) == {"loss_spikes": "warning"} and r.verdict == "warning"
    spike = r.findings[0]
    assert spike.steps == [25] and spike.title.startswith(
        "1 loss spike(s), first at step 25; the largest 1e+30 at step 25")
    assert _codes(path) == (0, 1)


def test_a_loss_that_falls_fast_at_the_start_is_no_spike(tmp_path):
    """Windows look back: a first loss 20x the later ones is a descent, not a spike."""
    rows = [{"loss": 10.0 * 0.6 ** i + 0.4, "grad_norm": 1.0 + 0.01 * (i % 3)}
            for i in range(40)]
    r = health_report(_console(tmp_path, rows))
    assert r.verdict == "healthy" and not _rules(r)


def test_a_spike_the_guard_skipped_is_information(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": i + 1, "loss": 2.0 - 0.005 * i, "grad_norm": 1.0 + 0.01 * (i % 3),
             "skipped": 0} for i in range(40)]
    rows[24].update(loss=1e30, skipped=1)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = health_report(run)
    assert _rules(r) == {"loss_spikes": "info"} and r.verdict == "healthy"


@pytest.mark.parametrize("level,expected", [("warning", 1), ("unhealthy", 0)])
def test_watch_exit_on_acts_on_the_loss_spike(tmp_path, capsys, level, expected):
    rows = _steady(40)
    rows[24]["loss"] = 1e30
    path = _console(tmp_path, rows)
    code = main(["watch", str(path), "--plain", "--exit-on", level, "--idle-exit", "0.5",
                 "--interval", "0.05"])
    out = capsys.readouterr().out
    assert code == expected and "loss spike" in out


def test_watch_exit_on_unhealthy_acts_on_the_exploded_end(tmp_path, capsys):
    path = _console(tmp_path, [*_steady(40), {"loss": 1e20, "grad_norm": 1.0}])
    code = main(["watch", str(path), "--plain", "--exit-on", "unhealthy", "--idle-exit", "0.5",
                 "--interval", "0.05"])
    assert code == 1 and "Last loss 1e+20" in capsys.readouterr().out


# ------------------------------------------------------------- the loss cannot be read --
def test_a_loss_logged_as_loss_avg_is_read_and_its_nan_end_is_unhealthy(tmp_path):
    rows = [{"loss_avg": 2.0 - 0.02 * i if i < 20 else NAN, "grad_norm": 1.0,
             "learning_rate": 1e-4, "step": i + 1} for i in range(30)]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN as Python writes it
    r = health_report(path)
    assert r.metrics["loss"].total == 30 and r.metrics["loss"].nan == 10
    assert r.verdict == "unhealthy" and _rules(r)["nan_loss"] == "critical"
    assert _codes(path) == (1, 1)


@pytest.mark.parametrize("key", ["train_loss", "avg_loss", "mean_loss", "train/loss",
                                 "loss_avg", "running_loss"])
def test_every_usual_spelling_of_the_loss_is_the_loss(key):
    r = health_report([{key: 3.0 - 0.1 * i, "grad_norm": 1.0 + 0.01 * (i % 3),
                        "step": i + 1} for i in range(10)])
    assert r.metrics["loss"].total == 10 and r.verdict == "healthy"


def test_the_step_loss_wins_over_an_average_in_the_same_entry():
    r = health_report([{"loss_avg": 9.0, "loss": 3.0 - 0.1 * i, "step": i + 1}
                       for i in range(10)])
    assert r.metrics["loss"].max == 3.0


def test_a_four_entry_fragment_is_inconclusive_not_healthy(tmp_path, capsys):
    text = "".join(f'    {{\n      "epoch": {0.01 * i:.2f},\n      "grad_norm": {g},\n'
                   f'      "learning_rate": 2e-05,\n      "loss": {v},\n      "step": {i}\n'
                   "    },\n"
                   for i, (g, v) in enumerate([(83.1, 5.31), (90.2, 5.27), (86.5, 5.29),
                                               (88.0, 5.22)], 1))
    path = tmp_path / "fragment.json"
    path.write_text(text)
    r = health_report(path)
    assert len(r.series["step"]) == 4 and r.verdict == "inconclusive" and r.learns is None
    assert not [f for f in r.findings if f.severity != "info"]
    assert _codes(path) == (0, 1)
    main(["report", str(path)])
    md = capsys.readouterr().out
    assert "**Verdict: INCONCLUSIVE (exit code 0; 1 with --strict)**" in md
    assert "Model learns: not shown" in md and "HEALTHY" not in md
    assert "4 loss values are too few to test a trend" in md


def test_a_noisy_six_entry_loss_says_no_significant_trend(tmp_path):
    losses = [0.06, 0.15, 0.08, 0.19, 0.11, 0.21]
    r = health_report(_console(tmp_path, [{"loss": v, "grad_norm": 1.0} for v in losses]))
    assert (r.trend.direction, r.trend.evidence, r.trend.n) == ("none", "none", 6)
    text = trend_text(r)
    assert text.startswith("Trend: no significant trend over 6 points")
    assert "strong" not in text and "flat" not in text.split(".")[0]
    title = next(f.title for f in r.findings if f.rule == "loss_not_decreasing")
    assert title.startswith("Loss shows no significant trend over 6 points")
    assert "strong evidence" not in to_markdown(r) and r.verdict != "healthy"


@pytest.mark.parametrize("evidence", ["eval_json", "eval_series"])
def test_an_improved_evaluation_is_evidence_of_learning(tmp_path, evidence):
    if evidence == "eval_json":
        run = tmp_path / "run"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(
            {"step": i, "loss": 2.0 - 0.1 * i, "grad_norm": 1.0}) + "\n" for i in (1, 2)))
        (run / "eval.json").write_text(json.dumps({
            "before": {"exact_match": 0.1, "eval_loss": 3.0},
            "after": {"exact_match": 0.9, "eval_loss": 0.5}}))
        r = health_report(run)
        assert r.improvement.startswith("exact_match 0.1000 before training -> 0.9000 after")
    else:
        rows = [{"loss": 2.0, "grad_norm": 1.0, "step": 1}, {"eval_loss": 2.5, "step": 1},
                {"loss": 1.9, "grad_norm": 1.0, "step": 2}, {"eval_loss": 2.1, "step": 2}]
        r = health_report(rows)
        assert r.improvement.startswith("eval_loss 2.5000 at the first evaluation")
    assert r.verdict == "healthy" and r.learns is True
    assert r.conclusion.startswith("The model learns: ")


# ------------------------------------------------------------------ a converged run --
def _converging(grad_last: float | str) -> list[dict]:
    """transformers 4.x: loss rounded to 4 digits, so a memorised set prints 0.0."""
    rows = []
    for i in range(30):
        loss = round(2.0 * 0.6 ** i, 4)
        grad = 1.5 * 0.7 ** i if loss else grad_last * (1 - 0.01 * i)  # (NaN stays NaN)
        rows.append({"loss": loss, "grad_norm": grad, "learning_rate": 2e-5,
                     "epoch": round(0.1 * i, 2)})
    return rows


def test_a_loss_that_decays_to_a_rounded_zero_with_shrinking_grads_is_a_warning(tmp_path):
    path = _console(tmp_path, _converging(1e-5))
    rows = _converging(1e-5)
    assert rows[-1]["loss"] == 0.0 and rows[-1]["grad_norm"] < 1e-4
    r = health_report(path)
    assert _rules(r) == {"loss_converged_zero": "warning"}
    assert r.verdict == "warning" and r.learns is True
    title = r.findings[0].title
    assert title.startswith("Loss reached 0.0 on ") and "converged" in title
    assert "zero_loss" not in _rules(r) and "stuck" not in title
    assert _codes(path) == (0, 1)
    code = main(["watch", str(path), "--plain", "--exit-on", "unhealthy", "--idle-exit",
                 "0.5", "--interval", "0.05"])
    assert code == 0  # a job watched with --exit-on unhealthy is not killed for converging


@pytest.mark.parametrize("grad,rule", [(NAN, "hidden_nan_loss"), (0.0, "zero_loss")])
def test_zero_loss_with_a_nan_or_zero_grad_norm_stays_critical(tmp_path, grad, rule):
    r = health_report(_console(tmp_path, _converging(grad)))
    assert _rules(r)[rule] == "critical" and r.verdict == "unhealthy"


def test_zero_loss_without_a_descent_stays_critical(tmp_path):
    rows = [{"loss": 2.0, "grad_norm": 1.0}, {"loss": 1.9, "grad_norm": 1.0},
            *({"loss": 0.0, "grad_norm": 1e-5 * (10 - i)} for i in range(10))]
    r = health_report(_console(tmp_path, rows))
    assert _rules(r)["zero_loss"] == "critical"


def test_exit_codes_of_each_verdict():
    from finitetune.report.health import HealthReport

    codes = {}
    for verdict in ("healthy", "inconclusive", "warning", "unhealthy"):
        r = HealthReport.__new__(HealthReport)
        r.verdict = verdict
        codes[verdict] = (r.exit_code(), r.exit_code(strict=True))
    assert codes == {"healthy": (0, 0), "inconclusive": (0, 1), "warning": (0, 1),
                     "unhealthy": (1, 1)}

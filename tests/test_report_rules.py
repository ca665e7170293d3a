"""Every diagnosis rule of the health report, on logs written for it.

Logs are written as the Trainer prints them (``str(dict)``), so each rule is also exercised
through the console parser, and exit codes are checked through the real CLI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finitetune import health_report
from finitetune.cli.main import main
from finitetune.report.stats import theil_sen
from finitetune.rundir.jsonio import append_jsonl, write_json_atomic

NAN = float("nan")


def _log(tmp_path: Path, losses, norms, lrs=None) -> Path:
    lrs = lrs or [1e-4] * len(losses)
    path = tmp_path / "train.log"
    path.write_text("\n".join(
        str({"loss": loss, "grad_norm": g, "learning_rate": lr, "epoch": i / 10})
        for i, (loss, g, lr) in enumerate(zip(losses, norms, lrs, strict=True))) + "\n")
    return path


def _judge(path: Path, *flags: str):
    """(report, exit code, exit code with --strict), the codes from the CLI itself."""
    vocab = int(flags[flags.index("--vocab-size") + 1]) if "--vocab-size" in flags else None
    clip = float(flags[flags.index("--max-grad-norm") + 1]) if "--max-grad-norm" in flags else None
    report = health_report(path, vocab_size=vocab, max_grad_norm=clip)
    out = str(path.parent / "out.json")
    code = main(["report", str(path), *flags, "--format", "json", "-o", out])
    strict = main(["report", str(path), *flags, "--strict", "--format", "json", "-o", out])
    assert json.loads(Path(out).read_text())["verdict"] == report.verdict
    return report, code, strict


def _rules(report) -> dict[str, str]:
    return {f.rule: f.severity for f in report.findings}


DOWN = [2.6, 2.5, 2.35, 2.3, 2.2, 2.1, 2.05, 1.9, 1.85, 1.8]
DOWN20 = [round(3.0 - 0.05 * i, 4) for i in range(20)]
NORMS = [1.9, 1.7, 1.8, 1.6, 1.5, 1.6, 1.4, 1.5, 1.3, 1.4]


def test_clean_run_is_healthy(tmp_path):
    r, code, strict = _judge(_log(tmp_path, DOWN, NORMS))
    assert (r.verdict, code, strict, r.findings) == ("healthy", 0, 0, [])
    assert r.trend.direction == "decreasing" and r.trend.evidence == "strong"


def test_hidden_nan_loss_once_mid_run_is_a_warning(tmp_path):
    r, code, strict = _judge(_log(tmp_path, [*DOWN[:4], 0.0, *DOWN[5:]],
                                  [*NORMS[:4], NAN, *NORMS[5:]]))
    assert _rules(r) == {"hidden_nan_loss": "warning"} and (code, strict) == (0, 1)
    assert r.findings[0].steps == [5]


def test_hidden_nan_loss_that_lasts_to_the_end_is_unhealthy(tmp_path):
    r, code, _ = _judge(_log(tmp_path, DOWN[:6] + [0.0] * 4, NORMS[:6] + [NAN] * 4))
    assert _rules(r) == {"hidden_nan_loss": "critical"} and code == 1


@pytest.mark.parametrize(("losses", "severity", "code"), [
    ([*DOWN[:7], NAN, NAN, NAN], "critical", 1),  # ends NaN (logging_nan_inf_filter off)
    ([*DOWN[:9], NAN], "warning", 0),  # one NaN on the last line: not (yet) persistent
    ([*DOWN[:3], NAN, *DOWN[4:]], "warning", 0),
])
def test_visible_nan_loss(tmp_path, losses, severity, code):
    norms = [NAN if loss != loss else g for loss, g in zip(losses, NORMS, strict=True)]
    r, got, _ = _judge(_log(tmp_path, losses, norms))
    assert _rules(r)["nan_loss"] == severity and got == code
    assert "nonfinite_grad" not in _rules(r)  # NaN loss + NaN norm is one finding, not two


def test_persistent_nonfinite_grad_with_finite_loss(tmp_path):
    r, code, _ = _judge(_log(tmp_path, DOWN, NORMS[:3] + [NAN, float("inf")] * 3 + [NAN]))
    assert _rules(r) == {"nonfinite_grad": "critical"} and code == 1
    assert r.metrics["grad_norm"].inf == 3 and r.metrics["grad_norm"].nan == 4


def test_intermittent_nonfinite_grad_is_the_fp16_skip_pattern(tmp_path):
    norms = list(NORMS)
    norms[4] = norms[7] = NAN
    r, code, strict = _judge(_log(tmp_path, DOWN, norms))
    assert _rules(r) == {"fp16_skip_pattern": "warning"} and (code, strict) == (0, 1)
    assert r.findings[0].steps == [5, 8]


def test_early_nonfinite_grad_is_loss_scale_calibration(tmp_path):
    r, code, strict = _judge(_log(tmp_path, DOWN20, [NAN, NAN, *NORMS[2:], *NORMS]))
    assert _rules(r) == {"loss_scale_calibration": "info"} and (code, strict) == (0, 0)


def test_first_loss_in_the_thousands(tmp_path):
    r, code, _ = _judge(_log(tmp_path, [4321.0, *DOWN[1:]], NORMS))
    assert _rules(r) == {"implausible_first_loss": "critical"} and code == 1
    assert "assumed" in r.findings[0].title


def test_first_loss_bound_uses_the_given_vocab(tmp_path):
    path = _log(tmp_path, [9.5, *DOWN[1:]], NORMS)
    assert _judge(path)[0].verdict == "healthy"  # 9.5 < ln(262144) + 2.5
    r, code, _ = _judge(path, "--vocab-size", "512")  # ln(512) + 2.5 = 8.74
    assert _rules(r) == {"implausible_first_loss": "critical"} and code == 1


@pytest.mark.parametrize(("lrs", "severity", "code"), [
    ([0.0] * 10, "critical", 1),
    ([1e-4] * 5 + [0.0] * 3 + [1e-4] * 2, "warning", 0),
    ([1e-4] * 9 + [0.0], "info", 0),  # a linear schedule ends at 0
    ([0.0, *[1e-4] * 9], "info", 0),  # a linear warm-up starts at 0
    ([0.0] * 2 + [1e-4] * 8, "warning", 0),
])
def test_zero_learning_rate(tmp_path, lrs, severity, code):
    r, got, _ = _judge(_log(tmp_path, DOWN, NORMS, lrs))
    assert _rules(r)["zero_lr"] == severity and got == code


def test_loss_stuck_at_zero_with_finite_norms(tmp_path):
    r, code, _ = _judge(_log(tmp_path, DOWN[:5] + [0.0] * 5, NORMS[:5] + [0.0] * 5))
    assert _rules(r) == {"zero_loss": "critical"} and code == 1
    assert "nothing is supervised" in r.findings[0].title and r.findings[0].steps == [6, 10]


def test_grad_norm_zero_with_a_nonzero_loss(tmp_path):
    r, code, _ = _judge(_log(tmp_path, DOWN, [0.0] * 10))
    assert _rules(r) == {"zero_grad_norm": "critical"} and code == 1


def test_grad_norm_pinned_at_the_clip_value(tmp_path):
    path = _log(tmp_path, DOWN, NORMS[:3] + [1.0] * 7)
    assert "at one constant value" in _judge(path)[0].findings[0].title  # clip unknown
    r, code, strict = _judge(path, "--max-grad-norm", "1.0")
    assert _rules(r) == {"pinned_grad_norm": "warning"} and (code, strict) == (0, 1)
    assert "max_grad_norm = 1" in r.findings[0].title


def test_grad_norm_constant_without_a_known_clip(tmp_path):
    r, _, _ = _judge(_log(tmp_path, DOWN, [1.9, 1.8] + [0.7342] * 8))
    assert _rules(r) == {"pinned_grad_norm": "warning"}
    assert "0.7342" in r.findings[0].title and r.findings[0].steps == [3, 10]


def test_grad_norm_spike_is_noted(tmp_path):
    norms = NORMS * 2
    norms[13] = 80.0
    r, code, strict = _judge(_log(tmp_path, DOWN20, norms))
    assert _rules(r) == {"grad_norm_spikes": "info"} and (code, strict) == (0, 0)
    assert r.findings[0].steps == [14]


def test_flat_and_rising_loss_are_not_learning(tmp_path):
    flat = [2.31, 2.29, 2.33, 2.30, 2.32, 2.28, 2.31, 2.30, 2.33, 2.29]  # last < first
    r, code, strict = _judge(_log(tmp_path, flat, NORMS))
    # the interval includes 0: no trend found, which is named as such (not "flat, strong")
    assert r.trend.direction == "none" and _rules(r) == {"loss_not_decreasing": "warning"}
    assert (code, strict, r.learns) == (0, 1, None)
    assert "no significant trend over 10 points" in r.findings[0].title
    r, _, _ = _judge(_log(tmp_path, DOWN[::-1], NORMS))
    assert r.trend.direction == "increasing" and "loss_not_decreasing" in _rules(r)


def test_theil_sen_is_robust_and_weak_with_few_points():
    pts = [(i, 3.0 - 0.1 * i) for i in range(1, 21)]
    pts[15] = (16, 300.0)  # one 100x spike
    t = theil_sen(pts)
    assert t.direction == "decreasing" and abs(t.slope + 0.1) < 1e-9 and t.ci_high < 0
    t = theil_sen([(1, 2.2549), (2, 2.1651)])
    assert (t.direction, t.evidence, t.ci_low) == ("decreasing", "weak", None)
    assert round(t.slope, 4) == -0.0898
    assert theil_sen([(1, 2.0)]).direction == "unknown"


# ---------------------------------------------------------------------- run directory rules --
def _run(tmp_path: Path, events=(), eval_json=None, steps=4) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: tiny\n")
    for i in range(1, steps + 1):
        append_jsonl(run / "metrics.jsonl", {"step": i, "loss": 3.0 - 0.2 * i, "grad_norm": 1.0
                                             + 0.1 * i, "learning_rate": 1e-3, "skipped": False})
    for event in events:
        append_jsonl(run / "events.jsonl", event)
    if eval_json:
        write_json_atomic(run / "eval.json", eval_json)
    return run


def test_guard_halt_is_unhealthy(tmp_path):
    run = _run(tmp_path, events=[
        {"step": 5, "kind": "guard", "action": "skip", "reason": "nonfinite_grad"},
        {"step": 6, "kind": "guard", "action": "halt", "reason": "6 consecutive non-finite steps"}])
    r, code, _ = _judge(run)
    assert _rules(r) == {"guard_halt": "critical"} and code == 1
    assert "6 consecutive" in r.findings[0].title and r.guard["by_kind"] == {"skip": 1, "halt": 1}


def test_guard_rollback_is_a_warning(tmp_path):
    r, code, strict = _judge(_run(tmp_path, events=[{"step": 3, "kind": "guard",
                                                     "action": "rollback", "reason": "spike"}]))
    assert _rules(r) == {"guard_rollback": "warning"} and (code, strict) == (0, 1)


def _nan_step_run(tmp_path: Path, guarded: bool) -> Path:
    """8 steps; step 4 has a NaN loss and grad norm. Guarded: the guard skipped it."""
    run = tmp_path / ("guarded" if guarded else "plain")
    run.mkdir()
    for i in range(1, 9):
        bad = i == 4
        append_jsonl(run / "metrics.jsonl", {
            "step": i, "loss": math.nan if bad else 3.0 - 0.3 * i,
            "grad_norm": math.nan if bad else 1.0, "learning_rate": 1e-3,
            **({"skipped": int(bad)} if guarded else {})})
    if guarded:
        append_jsonl(run / "events.jsonl", {"step": 4, "kind": "guard", "action": "skip",
                                            "reason": "nonfinite_grad"})
    return run


def test_a_nan_step_the_guard_skipped_is_handled_not_a_warning(tmp_path):
    plain, code, strict = _judge(_nan_step_run(tmp_path, guarded=False))
    assert plain.verdict == "warning" and (code, strict) == (0, 1)
    assert "nan_loss" in _rules(plain)
    guarded, code, strict = _judge(_nan_step_run(tmp_path, guarded=True))
    assert guarded.verdict == "healthy" and (code, strict) == (0, 0)
    handled = [f for f in guarded.findings if f.title.startswith("Handled by the guard")]
    assert handled and all(f.severity == "info" and f.steps == [4] for f in handled)
    assert "fp16_skip_pattern" not in _rules(guarded) or _rules(guarded)["fp16_skip_pattern"] \
        == "info"


def test_accuracy_that_fell_and_nonfinite_eval_loss(tmp_path):
    r, _, _ = _judge(_run(tmp_path, eval_json={
        "before": {"exact_match": 0.41, "eval_loss": 2.0},
        "after": {"exact_match": 0.30, "eval_loss": NAN}}))
    assert _rules(r) == {"eval_dropped": "warning", "eval_nonfinite": "warning"}
    assert r.eval["after"]["eval_loss"] != r.eval["after"]["eval_loss"]  # NaN decoded back


def test_run_that_logged_no_step(tmp_path):
    r, code, strict = _judge(_run(tmp_path, steps=0))
    assert _rules(r) == {"no_steps": "warning"} and (code, strict) == (0, 1)
    assert r.learns is None and "No training step" in r.conclusion

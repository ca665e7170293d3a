"""The guard's pure decision and its spike detector (no torch, no model): NaN and
inf gradients and losses, empty windows, spikes and the halt, at the level of the decision
table, plus the config checks."""

import math

import pytest

from finitetune.errors import ConfigError
from finitetune.guard.policy import (
    Action,
    PolicyContext,
    Reason,
    Signals,
    SpikeDetector,
    StepStats,
    decide,
    robust_z,
)
from finitetune.settings.config import GuardConfig

CLEAN = StepStats(grad_norm=1.0, loss=2.0, tokens=100, micro_batches=1)
NO_SIGNALS = Signals()
FRESH = PolicyContext()


def _stats(**kw) -> StepStats:
    base = dict(grad_norm=1.0, loss=2.0, tokens=100, micro_batches=1)
    base.update(kw)
    return StepStats(**base)


def test_clean_step_is_applied_without_reason():
    d = decide(CLEAN, NO_SIGNALS, FRESH, GuardConfig())
    assert (d.action, d.reason) == (Action.APPLY, None)


def test_case8_nonfinite_loss_and_nonfinite_grad_are_told_apart():
    # Fault: NaN loss with finite grads, vs finite loss with NaN grads. Must: different reasons.
    loss_nan = decide(_stats(loss=math.nan, loss_nonfinite=True), NO_SIGNALS, FRESH, GuardConfig())
    grad_nan = decide(_stats(grad_norm=math.nan, grad_nonfinite=True), NO_SIGNALS, FRESH,
                      GuardConfig())
    assert (loss_nan.action, loss_nan.reason) == (Action.SKIP, Reason.NONFINITE_LOSS)
    assert (grad_nan.action, grad_nan.reason) == (Action.SKIP, Reason.NONFINITE_GRAD)


def test_case7_empty_window_is_no_valid_tokens_before_anything_else():
    # Fault: a window with 0 supervised tokens, whose loss is NaN (0/0). Must: the cause
    # (no_valid_tokens) is reported, not the symptom, and it never rolls back.
    stats = _stats(tokens=0, loss=None, loss_nonfinite=True, grad_nonfinite=True)
    d = decide(stats, NO_SIGNALS, PolicyContext(has_snapshot=True), GuardConfig(policy="rollback"))
    assert (d.action, d.reason) == (Action.SKIP, Reason.NO_VALID_TOKENS)


def test_case11_overflow_has_its_own_reason():
    d = decide(_stats(grad_norm=1e25, norm_overflow=True), NO_SIGNALS, FRESH, GuardConfig())
    assert (d.action, d.reason) == (Action.SKIP, Reason.NORM_OVERFLOW)


@pytest.mark.parametrize("policy, expected", [
    ("skip", Action.SKIP), ("rollback", Action.ROLLBACK), ("halt", Action.HALT)])
def test_policy_maps_faults_to_actions(policy, expected):
    ctx = PolicyContext(has_snapshot=True)
    d = decide(_stats(grad_nonfinite=True, grad_norm=math.nan), NO_SIGNALS, ctx,
               GuardConfig(policy=policy))
    assert d.action == expected


def test_case10_halt_after_max_consecutive_skips():
    # Fault: the (K+1)-th non-finite step in a row. Must: halt, never endless skipping.
    cfg = GuardConfig(max_consecutive_skips=3)
    bad = _stats(grad_nonfinite=True, grad_norm=math.nan)
    assert decide(bad, NO_SIGNALS, PolicyContext(consecutive_skips=2), cfg).action == Action.SKIP
    d = decide(bad, NO_SIGNALS, PolicyContext(consecutive_skips=3), cfg)
    assert d.action == Action.HALT and "in a row" in d.detail["note"]


def test_rollback_without_snapshot_skips_and_exhausted_rollbacks_halt():
    cfg = GuardConfig(policy="rollback", max_rollbacks=2)
    bad = _stats(grad_nonfinite=True, grad_norm=math.nan)
    assert decide(bad, NO_SIGNALS, PolicyContext(has_snapshot=False), cfg).action == Action.SKIP
    d = decide(bad, NO_SIGNALS, PolicyContext(rollbacks=2, has_snapshot=True), cfg)
    assert d.action == Action.HALT and "rollbacks" in d.detail["note"]


@pytest.mark.parametrize("spike_action, expected", [
    ("warn", Action.APPLY), ("skip", Action.SKIP), ("reduce_lr", Action.REDUCE_LR),
    ("rollback", Action.ROLLBACK), ("halt", Action.HALT)])
def test_upward_spikes_follow_spike_action(spike_action, expected):
    cfg = GuardConfig(spike_action=spike_action)
    d = decide(CLEAN, Signals(loss_z=50.0), PolicyContext(has_snapshot=True), cfg)
    assert (d.action, d.reason, d.detail["direction"]) == (expected, Reason.LOSS_SPIKE, "high")
    g = decide(CLEAN, Signals(grad_z=50.0), PolicyContext(has_snapshot=True), cfg)
    assert (g.action, g.reason) == (expected, Reason.GRAD_SPIKE)


def test_downward_spike_and_low_side_alarms_only_warn():
    cfg = GuardConfig(spike_action="skip", zero_loss_patience=4, pinned_norm_patience=6)
    low = decide(CLEAN, Signals(loss_z=-50.0), FRESH, cfg)
    assert (low.action, low.reason, low.detail["direction"]) == (
        Action.APPLY, Reason.LOSS_SPIKE, "low")
    zero = decide(_stats(loss=0.0), Signals(zero_loss_run=4), FRESH, cfg)
    assert (zero.action, zero.reason) == (Action.APPLY, Reason.ZERO_LOSS)
    # warned once when the run reaches the patience, not on every later step
    assert decide(_stats(loss=0.0), Signals(zero_loss_run=5), FRESH, cfg).reason is None
    pinned = decide(CLEAN, Signals(pinned_run=6), FRESH, cfg)
    assert (pinned.action, pinned.reason) == (Action.APPLY, Reason.PINNED_GRAD_NORM)


def test_scaler_overflow_is_calibration_not_a_fault():
    cfg = GuardConfig(max_consecutive_skips=2)
    stats = _stats(grad_nonfinite=True, grad_norm=math.inf, scaler_overflow=True)
    d = decide(stats, NO_SIGNALS, PolicyContext(consecutive_skips=5), cfg)
    assert (d.action, d.reason) == (Action.SKIP, Reason.SCALER_OVERFLOW)
    late = decide(stats, NO_SIGNALS, PolicyContext(consecutive_skips=100), cfg)
    assert late.action == Action.HALT


def test_forward_overflow_under_grad_scaler_is_a_fault_not_calibration():
    """A NaN/inf *loss* means the forward pass overflowed; a smaller loss scale cannot fix it,
    so it counts as a fault (and halts after max_consecutive_skips), not as calibration."""
    cfg = GuardConfig(max_consecutive_skips=2)
    stats = _stats(loss=math.nan, loss_nonfinite=True, grad_nonfinite=True, grad_norm=math.nan,
                   scaler_overflow=True)
    d = decide(stats, NO_SIGNALS, FRESH, cfg)
    assert (d.action, d.reason) == (Action.SKIP, Reason.NONFINITE_LOSS)
    third = decide(stats, NO_SIGNALS, PolicyContext(consecutive_skips=2), cfg)
    assert third.action == Action.HALT


def test_case9_detector_ignores_nan_and_needs_warmup():
    det = SpikeDetector(window=10, warmup=5, min_scale=0.02)
    for v in (2.0, 2.1, 1.9, 2.05):
        det.push(v)
    assert det.score(200.0) is None  # warm-up: 4 < 5 values
    det.push(math.nan)
    det.push(math.inf)
    det.push(None)
    assert len(det.values) == 4  # non-finite values never enter the window
    det.push(1.95)
    assert det.score(200.0) > 100  # 100x spike
    assert abs(det.score(2.0)) < 1
    assert det.score(math.nan) is None
    assert det.score(0.02) < -10  # two-sided: a collapse is seen too


def test_robust_z_floor_keeps_constant_signal_from_alarming():
    window = [1.0] * 20  # MAD = 0
    assert robust_z(window, 1.001, 0.02) < 1
    assert robust_z(window, 1.5, 0.02) == pytest.approx(25.0)


def test_config_validation_says_what_is_wrong():
    with pytest.raises(ConfigError, match="spike_warmup"):
        GuardConfig(spike_window=5, spike_warmup=10)
    with pytest.raises(ConfigError, match="lr_backoff"):
        GuardConfig(lr_backoff=0.0)
    with pytest.raises(ConfigError, match="policy"):
        GuardConfig(policy="explode")
    with pytest.raises(ConfigError, match="spike_action"):
        GuardConfig(spike_action="panic")
    cfg = GuardConfig(policy="rollback", spike_action="warn")
    assert cfg.needs_snapshots and GuardConfig(**cfg.to_dict()) == cfg

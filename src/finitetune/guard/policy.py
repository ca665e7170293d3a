"""The guard's decision: pure functions over host numbers, no torch, no I/O.

Everything here runs after the guard's single host sync, on plain Python floats, so it can be
unit-tested exhaustively without a model (``tests/test_guard_policy.py``). ``decide`` maps what
was measured in one optimizer step (:class:`StepStats`) plus what the guard remembers
(:class:`PolicyContext`) to an :class:`Action` and a :class:`Reason`; the
:class:`~finitetune.guard.guard.Guard` then enacts it.

The spike detector is two-sided and robust: median / MAD over a rolling window of values from
*applied* steps only. A NaN, or a spike that was acted on, never enters the window, so one bad
step cannot inflate the spread and hide the next one ("poisoning" the detector).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from finitetune.numerics.robust_stats import median, robust_scale, robust_z
from finitetune.settings.config import GuardConfig, GuardPolicy, SpikeAction

__all__ = [
    "Action", "Decision", "PolicyContext", "Reason", "Signals", "SpikeDetector", "StepOutcome",
    "StepStats", "decide", "robust_z",
]

FP32_MAX = 3.4028234663852886e38
"""A squared total norm above this overflows float32: the usual fp32 norm would read inf."""

class Action(str, Enum):
    """What the guard did with an optimizer step."""

    APPLY = "apply"
    """``optimizer.step()`` was called (possibly after clipping, possibly with a warning)."""
    SKIP = "skip"
    """Not called: parameters and optimizer state are bit-identical to before the step."""
    ROLLBACK = "rollback"
    """Not called; parameters and optimizer state restored to the last good snapshot; LR lowered."""
    REDUCE_LR = "reduce_lr"
    """Not called; LR multiplied by ``lr_backoff`` for the following steps."""
    HALT = "halt"
    """Not called; training must stop (``NonFiniteHalt``)."""


class Reason(str, Enum):
    """Why a step was not simply applied (or was applied with a warning)."""

    NONFINITE_GRAD = "nonfinite_grad"
    """A gradient element is NaN or +-inf."""
    NORM_OVERFLOW = "norm_overflow"
    """Every gradient element is finite, but the squared total norm overflows float32."""
    NONFINITE_LOSS = "nonfinite_loss"
    """The loss of a micro-batch with supervised tokens is NaN or +-inf (gradients finite)."""
    NO_VALID_TOKENS = "no_valid_tokens"
    """The accumulation window has no supervised token: there is nothing to learn from."""
    LOSS_SPIKE = "loss_spike"
    """The loss is far from its recent level (``detail['direction']``: high or low)."""
    GRAD_SPIKE = "grad_spike"
    """The pre-clip grad norm is far from its recent level."""
    ZERO_LOSS = "zero_loss"
    """The loss has been exactly 0.0 for ``zero_loss_patience`` steps (warning)."""
    PINNED_GRAD_NORM = "pinned_grad_norm"
    """The pre-clip grad norm stayed constant or at ``max_grad_norm`` for long (warning)."""
    SCALER_OVERFLOW = "scaler_overflow"
    """fp16 GradScaler found inf/NaN while calibrating its scale: skipped, not a fault."""
    RANK_MISMATCH = "rank_mismatch"
    """Ranks that should hold the same gradients or parameters do not (``detail['ranks']``)."""


FAULT_REASONS = frozenset({Reason.NONFINITE_GRAD, Reason.NORM_OVERFLOW, Reason.NONFINITE_LOSS})
SPIKE_REASONS = frozenset({Reason.LOSS_SPIKE, Reason.GRAD_SPIKE})
CONFIRM_Z = 3.0
"""With ``spike_confirm``: the loss z-score above which it confirms a grad-norm spike. Measured
(``bench/bench_stability.py --healthy``): healthy norm spikes came with loss z in [-2.4, -0.2];
``finitetune verify``'s diverging learning rate with loss z 5.7."""
SCALER_CALIBRATION_SKIPS = 24
"""fp16 GradScaler overflows in a row tolerated on top of ``max_consecutive_skips``."""


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step measured, as host numbers (after the single sync)."""

    grad_norm: float
    """Pre-clip total L2 norm of the gradients (NaN/inf when they are not finite)."""
    grad_nonfinite: bool = False
    """Some gradient element is NaN or +-inf."""
    norm_overflow: bool = False
    """All elements finite, squared total norm above float32's range."""
    loss: float | None = None
    """Loss of the step (token-weighted over the micro-batches that had tokens); None if no
    loss was observed or the window had no supervised tokens."""
    loss_nonfinite: bool = False
    """Some micro-batch with supervised tokens had a non-finite loss."""
    tokens: int | None = None
    """Supervised tokens in the window (all ranks); None if not reported for every micro-batch."""
    micro_batches: int = 0
    """Micro-batches observed with ``observe_loss``."""
    empty_micro_batches: int = 0
    """Micro-batches that had zero supervised tokens (they add 0, not NaN; not a fault)."""
    scaler_overflow: bool = False
    """An fp16 GradScaler found inf/NaN in this step's (scaled) gradients."""


@dataclass(frozen=True)
class Signals:
    """Detector readings for this step (computed before the step's values enter any window)."""

    loss_z: float | None = None
    """Robust z-score of the loss against the window; None during warm-up or without a loss."""
    grad_z: float | None = None
    """Robust z-score of the pre-clip grad norm."""
    zero_loss_run: int = 0
    """Consecutive steps, this one included, whose loss is exactly 0.0."""
    pinned_run: int = 0
    """Consecutive steps, this one included, whose norm equals the previous one or the clip."""
    loss_above_start: bool | None = None
    """Whether the loss is above the run's starting level (the highest of its first
    ``spike_warmup`` losses); None while that is not known."""


@dataclass(frozen=True)
class PolicyContext:
    """What the guard remembers that the decision depends on."""

    consecutive_skips: int = 0
    """Steps not applied in a row, before this one."""
    rollbacks: int = 0
    """Rollbacks done so far."""
    has_snapshot: bool = False
    """Whether a last-good snapshot exists to roll back to."""


@dataclass(frozen=True)
class Decision:
    """Output of :func:`decide`."""

    action: Action
    reason: Reason | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepOutcome:
    """What the guard decided and did for one optimizer step (returned by ``Guard.step``)."""

    step: int
    """1-based index of the optimizer step (attempts, applied or not; equals the Trainer's
    ``global_step`` after the step)."""
    applied: bool
    """Whether ``optimizer.step()`` was (or, with ``Guard.check``, is to be) called."""
    action: Action
    reason: Reason | None
    grad_norm: float
    """Pre-clip total gradient norm (what the Trainer logs as ``grad_norm`` under the callback)."""
    loss: float | None = None
    tokens: int | None = None
    micro_batches: int = 0
    empty_micro_batches: int = 0
    clipped: bool = False
    """Whether the gradients were scaled down to ``max_grad_norm``."""
    consecutive_skips: int = 0
    """Steps not applied in a row, this one included."""
    lr_scale: float = 1.0
    """Product of all LR back-offs so far."""
    detail: dict[str, Any] = field(default_factory=dict)
    """Decision details: z-score, direction, why a rollback became a skip or a halt, ..."""

    @property
    def message(self) -> str:
        """One line for the log: what happened, why, and the numbers behind it."""
        what = {
            Action.APPLY: "applied with a warning", Action.SKIP: "skipped",
            Action.ROLLBACK: "rolled back to the last good state and skipped",
            Action.REDUCE_LR: "skipped and the learning rate lowered",
            Action.HALT: "skipped; training halts",
        }[self.action]
        why = self.reason.value if self.reason else "ok"
        loss = "n/a" if self.loss is None else f"{self.loss:.6g}"
        text = (f"step {self.step} {what} ({why}): grad_norm={self.grad_norm:.6g} loss={loss} "
                f"tokens={self.tokens if self.tokens is not None else 'n/a'}")
        if self.detail.get("note"):
            text += f"; {self.detail['note']}"
        return text


class SpikeDetector:
    """Rolling window of finite values with a robust z-score. Non-finite values never enter.

    Each value may carry the supervised-token count of its step's window, so a window that
    holds fewer tokens than usual (a partial last window of an epoch, a short batch) is judged
    for what it is: a mean over ``n`` tokens varies ``sqrt(n_ref / n)`` times more than one over
    the window's usual ``n_ref`` (the median count of the stored steps). ``kind="loss"``: the
    spread is widened by that factor (the level of a mean does not depend on ``n``).
    ``kind="norm"``: the norm of a mean gradient is up to that factor *larger* (its noise part
    grows as ``1 / sqrt(n)``), so the high side is judged on ``value / sqrt(n_ref / n)``; the low
    side on the value itself. Windows of the usual size or larger are judged as before.
    """

    def __init__(self, window: int, warmup: int, min_scale: float, kind: str = "loss") -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.tokens: deque[int | None] = deque(maxlen=window)
        self.warmup = warmup
        self.min_scale = min_scale
        self.kind = kind

    def size_ratio(self, tokens: int | None) -> float:
        """``n_ref / n`` (>= 1): how much smaller than usual this step's window is."""
        known = sorted(t for t in self.tokens if t)
        if not tokens or not known:
            return 1.0
        return max(1.0, median([float(t) for t in known]) / tokens)

    def score(self, value: float | None, tokens: int | None = None) -> float | None:
        """z-score of ``value``, or None during warm-up or for a missing/non-finite value."""
        if value is None or not math.isfinite(value) or len(self.values) < self.warmup:
            return None
        scale = robust_scale(self.values, self.min_scale)
        widen = math.sqrt(self.size_ratio(tokens))
        if self.kind == "loss":
            return (value - scale.center) / (scale.scale * widen)
        if value / widen > scale.center:
            return scale.z(value / widen)
        return min(0.0, scale.z(value))

    def push(self, value: float | None, tokens: int | None = None) -> None:
        """Add a value of an applied step; NaN/inf/None are dropped, never stored."""
        if value is not None and math.isfinite(value):
            self.values.append(float(value))
            self.tokens.append(tokens)

    def state_dict(self) -> list[float]:
        return list(self.values)

    def token_state(self) -> list[int | None]:
        return list(self.tokens)

    def load_state_dict(self, values: list[float], tokens: list[int | None] | None = None
                        ) -> None:
        self.values.clear()
        self.tokens.clear()
        counts = list(tokens) if tokens and len(tokens) == len(values) else [None] * len(values)
        for v, t in zip(values, counts, strict=True):
            self.push(v, t)

    def push_many(self, values: Iterable[float]) -> None:
        for v in values:
            self.push(v)


def classify(stats: StepStats, signals: Signals, config: GuardConfig) -> tuple[Reason | None, dict]:
    """The most important thing wrong with this step, in priority order, and its details.

    An empty window comes first (it explains a NaN loss), then non-finite gradients (the
    step cannot be applied whatever the loss says), overflow, a non-finite loss, upward spikes,
    and last the warnings that let the step through.
    """
    if stats.tokens == 0:
        return Reason.NO_VALID_TOKENS, {"note": "no supervised token in the window"}
    if stats.scaler_overflow and stats.loss_nonfinite:
        # the forward pass itself overflowed: a smaller loss scale cannot fix that
        return Reason.NONFINITE_LOSS, {"note": "forward overflow under GradScaler"}
    if stats.scaler_overflow:
        return Reason.SCALER_OVERFLOW, {"note": "GradScaler lowers its scale"}
    if stats.grad_nonfinite:
        return Reason.NONFINITE_GRAD, {}
    if stats.norm_overflow:
        return Reason.NORM_OVERFLOW, {"note": "finite gradients, squared norm overflows float32"}
    if stats.loss_nonfinite:
        return Reason.NONFINITE_LOSS, {}
    t = config.spike_threshold
    if signals.loss_z is not None and signals.loss_z > t:
        detail: dict[str, Any] = {"direction": "high", "z": signals.loss_z}
        if config.spike_confirm and signals.loss_above_start is False:
            # a batch much harder than the median, but no worse than the run's start
            detail.update(statistical=True, note="the loss is still below the run's starting "
                                                 "level: warned, not acted on")
        return Reason.LOSS_SPIKE, detail
    if signals.grad_z is not None and signals.grad_z > t:
        detail = {"direction": "high", "z": signals.grad_z}
        if config.spike_confirm and signals.loss_z is not None and signals.loss_z <= CONFIRM_Z:
            # the norm jumped, the loss did not: ordinary variance of a healthy run
            detail.update(statistical=True, loss_z=signals.loss_z,
                          note=f"the loss did not rise with it (z={signals.loss_z:.2g} <= "
                               f"{CONFIRM_Z:g}): warned, not acted on")
        return Reason.GRAD_SPIKE, detail
    for reason, z in ((Reason.LOSS_SPIKE, signals.loss_z), (Reason.GRAD_SPIKE, signals.grad_z)):
        if z is not None and z < -t:
            return reason, {"direction": "low", "z": z, "note": "far below its recent level"}
    if config.zero_loss_patience and signals.zero_loss_run == config.zero_loss_patience:
        return Reason.ZERO_LOSS, {"note": f"loss exactly 0.0 for {signals.zero_loss_run} steps"}
    if config.pinned_norm_patience and signals.pinned_run == config.pinned_norm_patience:
        return Reason.PINNED_GRAD_NORM, {
            "note": f"grad norm unchanged for {signals.pinned_run} steps"}
    return None, {}


_FAULT_ACTION = {GuardPolicy.SKIP: Action.SKIP, GuardPolicy.ROLLBACK: Action.ROLLBACK,
                 GuardPolicy.HALT: Action.HALT}
_SPIKE_ACTION = {SpikeAction.WARN: Action.APPLY, SpikeAction.SKIP: Action.SKIP,
                 SpikeAction.REDUCE_LR: Action.REDUCE_LR, SpikeAction.ROLLBACK: Action.ROLLBACK,
                 SpikeAction.HALT: Action.HALT}


def decide(stats: StepStats, signals: Signals, ctx: PolicyContext, config: GuardConfig) -> Decision:
    """Map one step's measurements to an action. Pure: same inputs, same decision.

    - no supervised tokens -> skip (never rollback: the state is fine, the data is empty);
    - GradScaler calibration overflow -> skip (halts only after a run far longer than
      calibration takes);
    - non-finite gradient / loss, norm overflow -> ``config.policy``;
    - upward spike -> ``config.spike_action``; one no second signal confirms
      (``spike_confirm``), downward spike, zero loss, pinned norm -> warn;
    - rollback without a snapshot yet -> skip; rollbacks exhausted -> halt;
    - more than ``max_consecutive_skips`` steps in a row not applied -> halt.
    """
    reason, detail = classify(stats, signals, config)
    if reason is None:
        return Decision(Action.APPLY)
    if reason == Reason.SCALER_OVERFLOW:
        # Calibration: GradScaler starts high and halves on each overflow. Only a run of overflows
        # far longer than calibration needs (2**16 -> 1 is 16 halvings) is a real fp16 problem.
        if ctx.consecutive_skips + 1 > config.max_consecutive_skips + SCALER_CALIBRATION_SKIPS:
            return Decision(Action.HALT, reason, {
                "note": "fp16 keeps overflowing after calibration; train in bf16 or fp32"})
        return Decision(Action.SKIP, reason, detail)
    if reason == Reason.NO_VALID_TOKENS:
        action = Action.SKIP
    elif reason in FAULT_REASONS:
        action = _FAULT_ACTION[GuardPolicy(config.policy)]
    elif reason in SPIKE_REASONS and detail.get("direction") == "high" and (
            not detail.get("statistical")):
        action = _SPIKE_ACTION[SpikeAction(config.spike_action)]
    else:
        action = Action.APPLY  # warnings: the step goes through
    if action == Action.ROLLBACK:
        if ctx.rollbacks >= config.max_rollbacks:
            action = Action.HALT
            detail = {**detail, "note": f"{ctx.rollbacks} rollbacks done (max_rollbacks)"}
        elif not ctx.has_snapshot:
            action = Action.SKIP
            detail = {**detail, "note": "no good snapshot yet; skipped instead of rolling back"}
    if action in (Action.SKIP, Action.ROLLBACK, Action.REDUCE_LR) and (
        ctx.consecutive_skips + 1 > config.max_consecutive_skips
    ):
        action = Action.HALT
        detail = {**detail, "note": f"{ctx.consecutive_skips + 1} steps in a row not applied "
                                    f"(max_consecutive_skips={config.max_consecutive_skips})"}
    return Decision(action, reason, detail)

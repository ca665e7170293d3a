"""``GuardSession``: what one ``train()`` call of a guarded Trainer holds, and every wrap it owns.

Started by the ``GuardCallback`` in ``on_train_begin`` (after accelerate prepared the optimizer
and the scheduler exists), closed at ``on_train_end`` and again, idempotently, in the mixin's
``train`` ``finally`` (exceptions). It owns three public seams, as instance-level wrappers it
installs and removes:

- the Trainer's Accelerator's ``clip_grad_norm_``: where every transformers release clips
  (``_clip_grad_norm`` / ``_get_grad_norm`` from 5.3, inline before): the call becomes the
  guard's decision, which returns the pre-clip norm and clips only if it applies the step. A
  Trainer that clips nothing (``max_grad_norm`` 0 on releases before 5.3) gets the decision at
  the optimizer's ``step`` instead;
- the optimizer's ``step`` (accelerate's ``AcceleratedOptimizer`` on the Trainer): on a skip
  it is simply not called, so parameters and every optimizer-state entry stay bit-identical;
- the LR scheduler's ``step``: for the run, ``trainer.lr_scheduler`` is a thin holder around
  the scheduler whose argument-less per-step ``step()`` is swallowed after a skip (unless
  ``scheduler_on_skip``), so the schedule counts applied updates; everything else reaches the
  scheduler itself (callbacks get the scheduler itself). Metric-driven schedulers
  (``ReduceLROnPlateau``, stepped with a metric at evaluation) are never held. (A wrapper set
  on the scheduler instance would land in its ``state_dict`` and break checkpointing.)

Nothing private of accelerate is written: the Trainer still reads
``accelerator.optimizer_step_was_skipped`` (False on a guard skip); the scheduler wrapper is
what holds the LR.

**Honest logs.** The Trainer's ``logging_nan_inf_filter`` replaces a NaN micro-batch loss by
the running average, which prints a window of NaN losses as ``loss 0.0``; with the filter off a
NaN sticks to every later log. On a log line whose window holds a step the guard did not apply
(or whose Trainer loss is non-finite), ``loss`` is replaced by the mean loss of the window's
*applied* steps, as the guard measured them (same definition as the Trainer's: the per-step
loss averaged over ranks, rounded to 4 digits); when no step of the window was applied it is the
true mean of the window's losses, NaN included (a step without a single supervised token has
no loss: NaN, where the Trainer would print 0.0). ``train_loss`` in the final summary follows the
same rule over the whole ``train()`` call. The ``guard/*`` counters on the same line say how
many steps were skipped. Clean windows keep the Trainer's own value, unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from finitetune.guard.guard import Guard
from finitetune.guard.policy import Action, StepOutcome
from finitetune.integrations.hf.seams import missing_decision_error
from finitetune.loss.targets import supervised_tokens

__all__ = ["GuardSession"]

_MISSING = object()


class GuardSession:
    """The guard of one ``train()`` call: its :class:`Guard`, decision of the current step,
    wrapped optimizer/scheduler ``step`` and the loss bookkeeping behind honest logs."""

    def __init__(self, trainer: Any, guard: Guard, *, shifts_labels: bool) -> None:
        self.trainer = trainer
        self.guard = guard
        self.shifts_labels = shifts_labels
        self.halt: Exception | None = None
        """The :class:`~finitetune.NonFiniteHalt` to raise once training has stopped."""
        self.pending: StepOutcome | None = None
        self.hold_scheduler = False
        self.closed = False
        self._undo: list[tuple[Any, str, Any]] = []
        self._window: list[StepOutcome] = []
        self._run_sum, self._run_n, self._run_handled = 0.0, 0, False
        self._wrap(trainer.accelerator, "clip_grad_norm_", self._guarded_clip)
        self._wrap(trainer.optimizer, "step", self._guarded_optimizer_step(trainer.optimizer))
        scheduler = trainer.lr_scheduler
        if scheduler is not None and not _metric_driven(scheduler):
            self._wrap(trainer, "lr_scheduler", HeldScheduler(scheduler, self))

    # ---- the micro-batch and the step ---------------------------------------------------------
    def before_micro_batch(self, inputs: Any) -> tuple[Any, torch.Tensor | None]:
        """Pop the collator's ``sample_ids`` (kept for attribution), count supervised tokens."""
        inputs = self.guard.observe_batch(inputs)
        return inputs, supervised_tokens(inputs, shift=self.shifts_labels)  # device tensor, no sync

    def after_micro_batch(self, loss: Any, tokens: torch.Tensor | None) -> None:
        # training_step's losses (divided by the window's token count or the accumulation
        # steps) add up to the step's loss, as the Trainer's own log adds them
        self.guard.observe_loss(loss, tokens, window_normalized=True)

    def decide(self) -> float:
        """The step's decision (once per step), clipping included; returns the pre-clip norm
        as a host float (the Trainer logs it without another sync)."""
        if self.pending is not None:
            return self.pending.grad_norm
        trainer = self.trainer
        trainer.accelerator.unscale_gradients()  # fp16 AMP: true gradients first (else no-op)
        outcome = self.guard.decide_and_prepare(step=trainer.state.global_step + 1)
        self.pending, self.hold_scheduler = outcome, False
        self._window.append(outcome)
        if outcome.applied and outcome.loss is not None:
            self._run_sum += outcome.loss
            self._run_n += 1
        self._run_handled |= not outcome.applied
        if outcome.action == Action.HALT:
            self.halt = self.guard.halt_error(outcome)
        return outcome.grad_norm

    def _guarded_clip(self, parameters: Any, max_norm: float, norm_type: float = 2,
                      **kwargs: Any) -> float:
        """``accelerator.clip_grad_norm_`` during the run: the guard decides (and clips, with
        its own norm and only if it applies the step); the Trainer logs the returned norm."""
        del parameters, max_norm, norm_type, kwargs  # the guard clips its own parameter groups
        return self.decide()

    def _guarded_optimizer_step(self, optimizer: Any) -> Any:
        step = optimizer.step

        # wraps(): keeps the marker torch's LR scheduler puts on optimizer.step (else it warns
        # that step was overridden)
        @functools.wraps(step)
        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            if self.pending is None and not self.trainer.args.max_grad_norm:
                self.decide()  # a Trainer that clips nothing asks nothing (before 5.3)
            outcome, self.pending = self.pending, None
            if outcome is None:  # the Trainer clipped some other way: maybe a NaN norm
                raise missing_decision_error(self.guard.max_grad_norm)
            if outcome.applied:
                return step(*args, **kwargs)
            if self.guard.scaler is not None:
                self.guard.scaler.update()  # lower the fp16 scale, reset its unscale state
            self.hold_scheduler = not self.guard.config.scheduler_on_skip
            return None

        return guarded_step

    # ---- logs ---------------------------------------------------------------------------------
    def amend_log(self, logs: dict[str, Any]) -> None:
        """Guard counters on training logs; the honest loss (module docstring)."""
        if "loss" in logs:
            window, self._window = self._window, []
            if any(not o.applied for o in window) or not _finite(logs["loss"]):
                value = _mean([o.loss for o in window if o.applied])
                if value is None:  # nothing applied: the window's true loss; none is NaN (0/0)
                    value = _mean([math.nan if o.loss is None else o.loss for o in window])
                if value is not None:
                    logs["loss"] = round(value, 4) if math.isfinite(value) else value
        if "train_loss" in logs and (self._run_handled or not _finite(logs["train_loss"])):
            logs["train_loss"] = self._run_sum / self._run_n if self._run_n else math.nan
        if "loss" in logs or "train_runtime" in logs:
            logs.update(self.guard.log_counters())

    # ---- wraps --------------------------------------------------------------------------------
    def _wrap(self, obj: Any, name: str, value: Any) -> None:
        self._undo.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def close(self) -> None:
        """Undo every wrap (idempotent): the optimizer and scheduler are as they were."""
        for obj, name, old in reversed(self._undo):
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, old)
        self._undo = []
        self.pending = None
        self.closed = True


class HeldScheduler:
    """``trainer.lr_scheduler`` during a guarded run: the scheduler, not advanced after a skip.

    Only ``step()`` without arguments (the Trainer's per-optimizer-step call) is held; every
    other attribute and call goes to the scheduler itself (``state_dict``, ``get_last_lr``).
    """

    def __init__(self, scheduler: Any, session: GuardSession) -> None:
        self.scheduler = scheduler
        self._session = session

    def step(self, *args: Any, **kwargs: Any) -> Any:
        session = self._session
        if session.hold_scheduler and not args and not kwargs:
            session.hold_scheduler = False
            return None
        return self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)


def _metric_driven(scheduler: Any) -> bool:
    """Stepped with a metric at evaluation, not per optimizer step (the Trainer's own test)."""
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) or \
        type(scheduler).__name__ == "GreedyLR"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None

"""What the guard remembers between steps to read a step's signals: the spike windows of the
loss and the grad norm, and the runs of a zero loss and of a pinned norm.

Pure Python on the host numbers of the guard's one sync. A step's :class:`Signals` are read
*before* its values enter any window, and only an applied step's values ever enter (``accept``):
a NaN, or a spike that was acted on, never shifts the reference the next step is judged by.
"""

from __future__ import annotations

import math
from typing import Any

from finitetune.guard.policy import Signals, SpikeDetector, StepStats
from finitetune.settings.config import GuardConfig

__all__ = ["SignalTracker"]


class SignalTracker:
    """The detectors' state, their reading of a step, and their part of the guard's state."""

    def __init__(self, config: GuardConfig) -> None:
        cfg = config
        self.loss = SpikeDetector(cfg.spike_window, cfg.spike_warmup, cfg.spike_min_scale, "loss")
        self.grad = SpikeDetector(cfg.spike_window, cfg.spike_warmup, cfg.spike_min_scale, "norm")
        self.zero_loss_run = 0
        self.pinned_run = 0
        self.last_norm: float | None = None
        self.start_losses = 0
        """Losses of applied steps seen, up to ``spike_warmup``: the run's start."""
        self.loss_start: float | None = None
        """The highest of those: the level a run that knows nothing yet has."""
        self.warmup = cfg.spike_warmup

    def read(self, stats: StepStats, clip: float) -> Signals:
        """This step's signals against the windows (``clip``: the clip value in force, for the
        pinned-norm warning; 0 when none)."""
        norm_ok = not (stats.grad_nonfinite or stats.norm_overflow)
        loss_ok = stats.loss is not None and not stats.loss_nonfinite
        norm = stats.grad_norm
        pinned = norm_ok and (
            (self.last_norm is not None and abs(norm - self.last_norm)
             <= 1e-6 * max(abs(self.last_norm), 1e-30))
            or (0 < clip < float("inf") and abs(norm - clip) <= 1e-6 * clip)
        )
        return Signals(
            loss_z=self.loss.score(stats.loss, stats.tokens) if loss_ok else None,
            grad_z=self.grad.score(norm, stats.tokens) if norm_ok else None,
            zero_loss_run=self.zero_loss_run + 1 if loss_ok and stats.loss == 0.0 else 0,
            pinned_run=self.pinned_run + 1 if pinned else 0,
            loss_above_start=(None if stats.loss is None or not loss_ok
                              or self.loss_start is None or self.start_losses < self.warmup
                              else bool(stats.loss > self.loss_start)),
        )

    def accept(self, stats: StepStats, signals: Signals) -> None:
        """An applied step: its values join the windows, its runs carry on."""
        self.loss.push(stats.loss, stats.tokens)
        if self.start_losses < self.warmup and stats.loss is not None and math.isfinite(
                stats.loss):
            self.start_losses += 1
            self.loss_start = max(stats.loss, self.loss_start or stats.loss)
        self.grad.push(stats.grad_norm, stats.tokens)
        self.zero_loss_run, self.pinned_run = signals.zero_loss_run, signals.pinned_run
        self.last_norm = stats.grad_norm

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_window": self.loss.state_dict(), "grad_window": self.grad.state_dict(),
            "loss_tokens": self.loss.token_state(), "grad_tokens": self.grad.token_state(),
            "zero_loss_run": self.zero_loss_run, "pinned_run": self.pinned_run,
            "last_norm": self.last_norm, "start_losses": self.start_losses,
            "loss_start": self.loss_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """What :meth:`state_dict` wrote; a checkpoint from before token counts were kept
        loads with none (its windows are judged as they were then)."""
        self.loss.load_state_dict(state.get("loss_window", []), state.get("loss_tokens"))
        self.grad.load_state_dict(state.get("grad_window", []), state.get("grad_tokens"))
        self.zero_loss_run = int(state.get("zero_loss_run", 0))
        self.pinned_run = int(state.get("pinned_run", 0))
        self.last_norm = state.get("last_norm")
        self.start_losses = int(state.get("start_losses", 0))
        self.loss_start = state.get("loss_start")

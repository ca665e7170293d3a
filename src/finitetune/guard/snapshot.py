"""Last good state for rollback: trainable parameters + their optimizer state, kept in memory.

Only the *trainable* parameters are copied (for LoRA that is the adapters, a few MB), with
``torch._foreach_copy_`` into buffers reused from one capture to the next. The guard captures a
state only *after* it has proven itself: just before applying a step whose loss and gradients
(computed from that very state) were finite and not spiking. A state produced by an update
that later turns out to be poisoned is therefore never stored as "good".
"""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["Snapshot", "backoff_lr", "unwrap_optimizer"]


class Snapshot:
    """One in-memory copy of parameters and optimizer state, restorable bit-exactly."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.params = list(params)
        self.optimizer = optimizer
        self.step: int | None = None
        """Guard step whose *pre-step* state this is (the state after ``step - 1`` steps)."""
        self._param_bufs: list[torch.Tensor] | None = None
        self._layout: list[tuple[int, str]] = []
        self._state_bufs: list[torch.Tensor] = []
        self._state_other: dict[int, dict[str, Any]] = {}

    @property
    def exists(self) -> bool:
        return self.step is not None

    @torch.no_grad()
    def capture(self, step: int) -> None:
        """Copy the current parameters and optimizer state (no host sync)."""
        live = [p.detach() for p in self.params]
        if self._param_bufs is None:
            self._param_bufs = [t.clone() for t in live]
        else:
            torch._foreach_copy_(self._param_bufs, live)
        # Collect the state tensors (references only; the copy below is one foreach call).
        layout: list[Any] = []
        srcs: list[torch.Tensor] = []
        other: dict[Any, Any] = {}
        for i, p in enumerate(self.params):
            state = self.optimizer.state.get(p)
            if not state:
                continue
            other[i] = {}
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    layout.append((i, key))
                    srcs.append(value.detach())
                else:
                    other[i][key] = copy.deepcopy(value)
        same = layout == self._layout and all(
            b.shape == s.shape and b.dtype == s.dtype and b.device == s.device
            for b, s in zip(self._state_bufs, srcs, strict=True)
        )
        if same and srcs:
            torch._foreach_copy_(self._state_bufs, srcs)
        elif not same:
            self._state_bufs = [s.clone() for s in srcs]
        self._layout, self._state_other = layout, other
        self.step = step

    @torch.no_grad()
    def restore(self) -> None:
        """Put the captured parameters (in place) and optimizer state (fresh copies) back."""
        if self._param_bufs is None:
            raise RuntimeError("no snapshot to restore")
        torch._foreach_copy_([p.detach() for p in self.params], self._param_bufs)
        states: dict[int, dict[str, Any]] = {i: dict(d) for i, d in self._state_other.items()}
        for (i, key), buf in zip(self._layout, self._state_bufs, strict=True):
            states.setdefault(i, {})[key] = buf.clone()
        for i, p in enumerate(self.params):
            if i in states:
                self.optimizer.state[p] = states[i]
            else:  # had no state yet at capture time: the optimizer re-initialises it lazily
                self.optimizer.state.pop(p, None)


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under wrappers such as accelerate's ``AcceleratedOptimizer``."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return inner


def backoff_lr(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float) -> float:
    """Multiply every param group's LR, and the scheduler's base LRs, by ``factor``.

    Both, because a closed-form scheduler (``LambdaLR``: lr = base_lr x f(step)) would undo a
    change to the group LR at its next step, and a recursive one reads the group LR. Returns
    ``factor`` (for the caller's running LR scale).
    """
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            if key in group:
                if isinstance(group[key], torch.Tensor):
                    group[key].mul_(factor)
                else:
                    group[key] = group[key] * factor
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return factor

"""``FaultHook``: what the guard calls when it does not apply a step (the attribution seam).

A plain callable ``hook(outcome) -> dict | None`` is enough for a hook that needs nothing but the
:class:`~finitetune.guard.policy.StepOutcome`. A hook that must read the step's micro-batches
(:class:`~finitetune.guard.attribution.Attributor` replays them) implements this protocol:
``Guard.__init__`` calls its ``bind_guard`` once, so it finds ``guard.batches`` and
``guard.output_dir`` without the caller wiring them twice.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

from finitetune.guard.policy import StepOutcome

__all__ = ["FaultHook", "GuardView"]


class GuardView(Protocol):
    """What a hook may read of the :class:`~finitetune.Guard` it serves (a structural type, so
    this module does not import the guard that imports it)."""

    output_dir: str | os.PathLike | None

    @property
    def batches(self) -> list[tuple[Any, Any]]:
        """(inputs, sample ids or None) of each micro-batch of the step being decided."""


@runtime_checkable
class FaultHook(Protocol):
    """An ``on_fault`` hook that is told which :class:`~finitetune.Guard` it serves."""

    def bind_guard(self, guard: GuardView) -> None:
        """Called once by ``Guard.__init__`` (before any step): keep ``guard`` to read its
        ``batches`` and ``output_dir`` when a step fails."""

    def __call__(self, outcome: StepOutcome) -> dict[str, Any] | None:
        """Called after every decision that does not apply the step, before a rollback changes
        the parameters (gradients as found). A returned dict is merged into the event line."""

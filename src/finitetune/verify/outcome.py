"""What a ``finitetune verify`` scenario concludes: its two arms, the checks that decide
"reproduced" and "fixed", and the checks every guarded arm must pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from finitetune.verify.harness import ArmResult, Check

__all__ = ["FAULT_STEP", "STEPS", "ScenarioResult", "common_fix_checks", "guard_acted", "num",
           "steps_text"]

STEPS = 20
"""Optimizer steps per arm: enough for a fault mid-run and a visible loss trend (~0.5 s)."""
FAULT_STEP = 7
"""Where the transient faults strike: after the loss has started to fall."""


@dataclass
class ScenarioResult:
    """One scenario: both arms and the checks that decide "reproduced" and "fixed"."""

    key: str
    title: str
    fault: str
    unguarded: ArmResult
    guarded: ArmResult
    reproduce: list[Check]
    fix: list[Check]
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    """Scenario-specific table rows: (label, unguarded, guarded)."""
    notes: list[str] = field(default_factory=list)

    @property
    def reproduced(self) -> bool:
        return all(c.ok for c in self.reproduce)

    @property
    def fixed(self) -> bool:
        return all(c.ok for c in self.fix)

    @property
    def ok(self) -> bool:
        return self.reproduced and self.fixed


def common_fix_checks(g: ArmResult) -> list[Check]:
    """What every guarded arm must show: finite, learning, and a clean report."""
    unexplained = g.unexplained_findings()
    loss = g.stat("loss")
    fell = (f"{loss.first:.4g} -> {loss.last:.4g}" if loss and loss.first is not None
            else "no finite loss")
    return [
        Check("training finished (no halt)" if g.halted is None else f"halted: {g.halted}",
              g.halted is None),
        Check("final parameters finite" if g.params_finite else "final parameters NOT finite",
              g.params_finite),
        Check(f"loss fell ({fell})", g.loss_fell()),
        Check(("report healthy" if g.report.verdict == "healthy" else
               f"report {g.report.verdict} only where the guard acted") if not unexplained
              else "report: " + "; ".join(
            f"{f.rule} ({f.severity})" for f in unexplained), not unexplained),
    ]


def guard_acted(g: ArmResult, steps: set[int], actions: tuple[str, ...],
                reasons: tuple[str, ...]) -> Check:
    """The guard took ``actions`` for ``reasons`` on exactly ``steps`` (the fault's steps)."""
    hits = {int(e["step"]) for e in g.events
            if e.get("action") in actions and e.get("reason") in reasons}
    return Check(f"guard {'/'.join(actions)} ({'/'.join(reasons)}) at step(s) "
                 f"{steps_text(hits) or 'none'} (fault at {steps_text(steps)})", hits == steps)


def steps_text(steps: set[int] | list[int]) -> str:
    return ", ".join(str(s) for s in sorted(steps))


def num(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"

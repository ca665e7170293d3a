"""``fp16_overflow``, the precision scenario of ``finitetune verify``: an activation beyond
fp16's range, trained in simulated fp16 (unguarded) and in the dtype the precision policy picks
(guarded).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from finitetune.numerics.constants import FP16_MAX
from finitetune.settings.config import GuardConfig
from finitetune.verify.harness import BATCH, Check, Setup, mlp_projection, run_arm
from finitetune.verify.outcome import STEPS, ScenarioResult, common_fix_checks

__all__ = ["OVERFLOW_SCALE", "ReducedPrecision", "fp16_overflow"]


OVERFLOW_SCALE = 2.0**24
"""How much larger the feed-forward activation is made (a power of two: exact in fp32/bf16)."""


class ReducedPrecision:
    """Simulates autocast's rounding on a CPU, where fp16 training does not exist.

    Every linear layer's output is rounded to ``dtype`` (what fp16/bf16 matmuls return), and
    the ``hot`` layer's output is computed ``OVERFLOW_SCALE`` times larger and scaled back, as
    in models whose feed-forward activations pass 65504 (T5, Gemma). In fp32 and bf16 the
    scaling is exact, so training is unchanged; in fp16 the large activation rounds to inf.
    """

    def __init__(self, model: torch.nn.Module, hot: str, dtype: torch.dtype | None) -> None:
        self.dtype = dtype
        self.max_abs = 0.0
        self._peak: list[torch.Tensor] = []
        self._handles = []
        for name, mod in model.named_modules():
            if type(mod).__name__ not in ("Linear", "Conv1D"):
                continue
            if name == hot:
                self._handles.append(mod.register_forward_hook(self._hot))
            elif dtype is not None:
                self._handles.append(mod.register_forward_hook(self._round))

    def _round(self, module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        return out.to(self.dtype).to(out.dtype)

    def _hot(self, module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        big = out * OVERFLOW_SCALE
        if module.training and len(self._peak) < 4:
            self._peak.append(big.detach().abs().amax())
        if self.dtype is not None:
            big = big.to(self.dtype).to(out.dtype)
        return big / OVERFLOW_SCALE

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._peak:
            self.max_abs = float(torch.stack(self._peak).max())  # read once, at the end


def fp16_overflow(setup: Setup, root: Path) -> ScenarioResult:
    """A feed-forward activation beyond fp16's 65504, trained in (simulated) fp16.

    Unguarded: the user's ``fp16=True``, simulated by rounding linear outputs to fp16 (the
    CPU has no fp16 training: the Trainer would silently use fp32): the activation is inf, the
    loss NaN from the first step, the weights NaN after it. Guarded: the precision policy
    (:func:`finitetune.choose_precision` for this device) picks the dtype, and the same
    simulation rounds to that dtype instead; the guard stays on as the backstop.

    What the policy proves here, honestly: verify runs on the CPU, where ``auto`` can never
    pick fp16 (fp16 training needs a CUDA GPU), so "the plan is not fp16" would be a check that
    cannot fail. The checks that can: an explicit fp16 request on this CPU is refused with a
    fix (the Trainer's own ``fp16=True`` silently trains in fp32 here), and the dtype the plan
    picks holds the overflowing activation (finite in the guarded run). Choosing between fp16
    and bf16 on a GPU is checked by ``bench/gpu_check.py`` on a real GPU.
    """
    from finitetune.precision.policy import choose_precision

    hot, _module = mlp_projection(setup.model)
    plan = choose_precision(setup.model, device="cpu", requested="auto")
    compute = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(plan.dtype)
    sims: dict[str, ReducedPrecision] = {}

    def simulate(role: str, dtype: torch.dtype | None) -> Callable[[Any], list[Any]]:
        def install(model: Any) -> list[Any]:
            sims[role] = ReducedPrecision(model, hot, dtype)
            return [sims[role]]
        return install

    rows = setup.take(STEPS * BATCH)
    u = run_arm(setup, root / "unguarded", "unguarded", rows, STEPS,
                inject=simulate("unguarded", torch.float16))
    g = run_arm(setup, root / "guarded", "guarded", rows, STEPS, guard=GuardConfig(),
                inject=simulate("guarded", compute))
    peak = sims["guarded"].max_abs
    reproduce = [
        Check("report: " + (", ".join(f.rule for f in u.findings()) or "healthy"),
              u.has_finding("hidden_nan_loss", "nan_loss", "nonfinite_grad")),
        Check("final parameters NaN" if not u.params_finite else "final parameters finite",
              not u.params_finite),
    ]
    refusal = _explicit_fp16_refusal(setup.model)
    fix = [Check("an explicit fp16 request on this CPU is refused with a fix"
                 + (f" ({refusal})" if refusal else " (it was accepted)"), bool(refusal)),
           Check(f"the {plan.dtype} plan holds the activation (|x| up to {peak:.3g} is finite in "
                 f"{plan.dtype})", math.isfinite(peak)),
           Check(f"the activation really passes fp16's max in the guarded run too "
                 f"(|x| up to {peak:.3g} > {FP16_MAX:g})", peak > FP16_MAX),
           *common_fix_checks(g)]
    rows_table = [("precision", "fp16 (simulated rounding)",
                   f"{plan.dtype} (choose_precision)"),
                  (f"max |activation| of {hot}", "inf in fp16", f"{peak:.3g}")]
    notes = [f"precision plan for this machine: {plan}",
             "fp16 vs bf16 choice: not applicable here (verify runs on the CPU, where auto never "
             "picks fp16); bench/gpu_check.py checks it on a GPU"]
    return ScenarioResult("fp16_overflow", "an activation overflow in reduced precision",
                          f"{hot} output x{OVERFLOW_SCALE:.0f} (|x| > 65504), rounded to the "
                          "compute dtype", u, g, reproduce, fix, rows_table, notes)


def _explicit_fp16_refusal(model: Any) -> str:
    """The policy's answer to ``--precision fp16`` on the CPU: its error's first clause, or ""
    when it accepted the request (which would be a bug: the Trainer would train fp32)."""
    from finitetune.errors import ConfigError
    from finitetune.precision.policy import choose_precision

    try:
        choose_precision(model, device="cpu", requested="fp16")
    except ConfigError as exc:
        return str(exc).split(";")[0]
    return ""

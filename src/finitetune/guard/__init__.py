"""The gradient guard: check every optimizer step, never apply a non-finite one.

``Guard`` (plain loops), ``StepOutcome``, the pure ``decide`` and the ``FaultHook`` protocol
live here; the Trainer integration is ``finitetune.integrations.hf.callback.GuardCallback``. Nothing in
this package imports transformers. Names resolve lazily, so ``finitetune.guard.policy`` (pure
Python) can be imported without torch.
"""

from __future__ import annotations

from finitetune._lazy import lazy_getattr

_EXPORTS = {
    "Guard": "finitetune.guard.guard",
    "FaultHook": "finitetune.guard.hooks",
    "Action": "finitetune.guard.policy",
    "Reason": "finitetune.guard.policy",
    "StepOutcome": "finitetune.guard.policy",
    "StepStats": "finitetune.guard.policy",
    "decide": "finitetune.guard.policy",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr("finitetune.guard", _EXPORTS, globals())

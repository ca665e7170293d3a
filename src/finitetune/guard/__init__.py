"""The gradient guard: check every optimizer step, never apply a non-finite one.

``Guard`` (plain loops), ``StepOutcome``, the pure ``decide`` and the ``FaultHook`` protocol
live here; the Trainer integration is ``finitetune.integrations.hf.callback.GuardCallback``. Nothing in
this package imports transformers. Names resolve lazily, so ``finitetune.guard.policy`` (pure
Python) can be imported without torch.
"""

from __future__ import annotations

from finitetune._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "finitetune.guard.guard": "Guard",
    "finitetune.guard.hooks": "FaultHook",
    "finitetune.guard.policy": "Action Reason StepOutcome StepStats decide",
}, globals())

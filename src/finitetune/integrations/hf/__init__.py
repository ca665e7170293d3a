"""transformers' Trainer (and TRL's trainers, PEFT models) under the guard: the one-line
``GuardCallback``, the guarded mixin, checkpoint protection, the hidden-state loss, and the one
list of private Trainer parts used (``seams``).
"""

from __future__ import annotations

from finitetune._lazy import lazy_getattr

_EXPORTS = {
    "GuardCallback": "finitetune.integrations.hf.callback",
    "guard_of": "finitetune.integrations.hf.mixin",
    "GuardedTrainerMixin": "finitetune.integrations.hf.callback",
    "guarded": "finitetune.integrations.hf.callback",
    "CheckpointCallback": "finitetune.integrations.hf.checkpoint_callback",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr("finitetune.integrations.hf", _EXPORTS, globals())

"""transformers' Trainer (and TRL's trainers, PEFT models) under the guard: the one-line
``GuardCallback``, the guarded mixin, checkpoint protection, the hidden-state loss, and the one
list of private Trainer parts used (``seams``).
"""

from __future__ import annotations

from finitetune._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "finitetune.integrations.hf.callback": "GuardCallback GuardedTrainerMixin guarded",
    "finitetune.integrations.hf.mixin": "guard_of",
    "finitetune.integrations.hf.checkpoint_callback": "CheckpointCallback",
}, globals())

"""finitetune: fine-tuning that stays finite, learns, and says plainly when it would not have.

The public surface is the short ``__all__`` below (locked by ``tests/test_public_api.py``).
Names resolve lazily so that ``import finitetune`` (and CLI verbs such as ``report`` that need no
model) does not pay for importing torch and transformers.
"""

from __future__ import annotations

from finitetune import _moved
from finitetune._lazy import lazy_exports

_moved.install()  # the previous release's module paths keep importing, with a warning

__version__ = "0.1.0"

# name -> module that defines it
__getattr__, __all__ = lazy_exports(__name__, {
    "finitetune.data.labels": "validate_labels LabelReport",
    "finitetune.loss.causal": "causal_lm_loss",
    "finitetune.guard.guard": "Guard",
    "finitetune.settings.config": "GuardConfig",
    "finitetune.guard.policy": "StepOutcome",
    "finitetune.integrations.hf.callback": "GuardCallback",
    "finitetune.errors": "NonFiniteHalt",
    "finitetune.precision.policy": "choose_precision PrecisionPlan",
    "finitetune.report.health": "health_report HealthReport",
}, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""finitetune: fine-tuning that stays finite, learns, and says plainly when it would not have.

The public surface is the short ``__all__`` below (locked by ``tests/test_public_api.py``).
Names resolve lazily so that ``import finitetune`` (and CLI verbs such as ``report`` that need no
model) does not pay for importing torch and transformers.
"""

from __future__ import annotations

from finitetune import _moved
from finitetune._lazy import lazy_getattr

_moved.install()  # the previous release's module paths keep importing, with a warning

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS: dict[str, str] = {
    "validate_labels": "finitetune.data.labels",
    "LabelReport": "finitetune.data.labels",
    "causal_lm_loss": "finitetune.loss.causal",
    "Guard": "finitetune.guard.guard",
    "GuardConfig": "finitetune.settings.config",
    "StepOutcome": "finitetune.guard.policy",
    "GuardCallback": "finitetune.integrations.hf.callback",
    "NonFiniteHalt": "finitetune.errors",
    "choose_precision": "finitetune.precision.policy",
    "PrecisionPlan": "finitetune.precision.policy",
    "health_report": "finitetune.report.health",
    "HealthReport": "finitetune.report.health",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr("finitetune", _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

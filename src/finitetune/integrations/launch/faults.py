"""``--inject`` fault specs (pure Python: the CLI parses them without importing torch).

Fault injection into any Trainer: ``finitetune run --inject nan_grad@3`` proves the guard on a
user's own pipeline (and, without the guard, shows the failure it prevents).

Specs (1-based optimizer steps, as the Trainer's ``global_step`` counts them):

- ``nan_grad@K``: NaN in one element of one trainable parameter's gradient during step K (a
  gradient hook, as a backward overflow would leave it; it stays in the accumulated gradient);
- ``inf_grad@K``: +inf instead of NaN in that element (a finite-looking overflow: the total
  norm is inf, not NaN, which some trainers' own NaN checks let through);
- ``inf_loss@K``: +inf is added to the model's loss during step K: the loss is non-finite
  while the gradients stay finite, the case the Trainer's log filter hides best (models that
  return no loss, e.g. under DPO: +inf in one logit instead, which makes the gradients
  non-finite too);
- ``empty_batch@K``: every micro-batch of step K has all its ``labels`` set to -100, as a
  batch whose responses were all truncated away (needs ``dataloader_num_workers=0``).

``:rankR`` after a spec (``nan_grad@3:rank1``) injects on that rank only (distributed runs).
:class:`~finitetune.integrations.launch.callbacks.FaultInjector` writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from finitetune.errors import ConfigError

__all__ = ["KINDS", "FaultSpec"]

KINDS = ("nan_grad", "inf_grad", "inf_loss", "empty_batch")
_SPEC = re.compile(r"^(?P<kind>[a-z_]+)@(?P<step>\d+)(?::rank(?P<rank>\d+))?$")


@dataclass(frozen=True)
class FaultSpec:
    """One fault: what, at which optimizer step, on which rank (None: every rank)."""

    kind: str
    step: int
    rank: int | None = None

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """``"nan_grad@3"`` or ``"empty_batch@2:rank1"``; a ConfigError says what is wrong."""
        m = _SPEC.match(text.strip())
        if m is None or m["kind"] not in KINDS or int(m["step"]) < 1:
            raise ConfigError(f"--inject {text!r}: expected KIND@STEP[:rankR] with KIND one of "
                              f"{', '.join(KINDS)} and STEP >= 1, e.g. nan_grad@3")
        return cls(m["kind"], int(m["step"]), None if m["rank"] is None else int(m["rank"]))

    def __str__(self) -> str:
        return f"{self.kind}@{self.step}" + (f":rank{self.rank}" if self.rank is not None else "")

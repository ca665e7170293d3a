"""Cross-rank consistency: ranks that should hold the same numbers, checked in the guard's one
all-reduce.

Data-parallel replicas are meant to be identical: under DDP every rank holds the same
all-reduced gradients and the same parameters; under DeepSpeed ZeRO-1/2 the same parameters
(gradients and optimizer state are partitioned). A faulty device or a desynchronised collective
breaks that silently: training goes on, and the ranks drift apart. Megatron compares parameter
hashes across replicas and fairseq compares gradient norms across workers for this reason.

Here each rank writes what it sees into its own slot of two ``(world_size,)`` vectors that are
appended to the guard's packed step vector (:mod:`~finitetune.guard.step_vector`), so the check
adds *no* collective and no host sync, only ``2 x world_size`` floats to the one all-reduce:

- its local squared gradient norm, every step, when gradients are replicated (already computed
  by the guard: free);
- every ``rank_check_every`` steps, a checksum of its replicated parameters (one
  ``_foreach_norm`` pass over them, on the device).

After the reduce every rank reads all slots, so all ranks find the same odd ones out and take
the same decision (:func:`resolve`). Values that are not finite are left to the non-finite
checks, which already name the ranks that saw them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from finitetune import distributed
from finitetune.guard.distributed import rank_slots
from finitetune.guard.policy import (
    Action,
    Decision,
    PolicyContext,
    Reason,
    Signals,
    StepStats,
    decide,
)
from finitetune.settings.config import GuardConfig, RankMismatchAction

__all__ = ["RankCheck", "odd_ranks", "resolve"]

_ACTION = {RankMismatchAction.HALT: Action.HALT, RankMismatchAction.SKIP: Action.SKIP,
           RankMismatchAction.WARN: Action.APPLY}


class RankCheck:
    """Per-rank slots for the guard's packed vector, and their comparison after the reduce.

    ``grads``: compare each rank's local gradient norm (only where gradients are replicated:
    DDP). ``params``: the replicated parameters to checksum every ``config.rank_check_every``
    steps (None: none are replicated, e.g. FSDP2 or ZeRO-3 shards). The guard sets both from
    the layout it detects; an integration that knows better (DeepSpeed) overrides them with
    :meth:`configure`.
    """

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.every = int(config.rank_check_every)
        self.tolerance = float(config.rank_tolerance)
        self.grads = False
        self.params: list[torch.Tensor] | None = None
        self._groups: list[tuple[torch.dtype, list[torch.Tensor]]] = []

    @classmethod
    def for_layout(cls, config: GuardConfig, replicated: bool,
                   params: Sequence[torch.Tensor]) -> RankCheck:
        """The check for a layout the guard detected: DDP (replicated) compares gradient norms
        and checksums ``params``; shards (FSDP2) compare nothing."""
        check = cls(config)
        check.configure(replicated, params if replicated else None)
        return check

    def configure(self, grads: bool, params: Sequence[torch.Tensor] | None) -> None:
        """Say what is replicated across ranks (gradients; which parameters)."""
        self.grads = bool(grads)
        self.params = list(params) if params else None
        self._groups = []
        if self.params:
            grouped = _group_tensors_by_device_and_dtype([[p.detach() for p in self.params]])
            self._groups = [(dtype, [t for t in tensors if t is not None])
                            for (_, dtype), ([tensors], _) in grouped.items()]

    @property
    def active(self) -> bool:
        """Whether the slots ride in the all-reduce (several ranks and something to compare)."""
        return self.every > 0 and distributed.world_size() > 1 and (
            self.grads or self.params is not None)

    @property
    def width(self) -> int:
        """Slots this check adds to the packed vector (0 when inactive)."""
        return 2 * distributed.world_size() if self.active else 0

    def checksum_due(self, step: int) -> bool:
        """Parameter checksum on this step (the same answer on every rank: steps agree)."""
        return self.params is not None and self.every > 0 and step % self.every == 0

    def slots(self, grad_vec: torch.Tensor, step: int) -> torch.Tensor | None:
        """``[local grad sq per rank | param checksum per rank]`` for this rank, on the device
        (None when inactive).

        ``grad_vec``: the guard's local gradient statistics (its first field is this rank's
        squared gradient norm). No host sync; the checksum pass only on :meth:`checksum_due`.
        """
        if not self.active:
            return None
        zero = torch.zeros((), dtype=grad_vec.dtype, device=grad_vec.device)
        grad_sq = grad_vec[0] if self.grads else zero
        checksum = self.checksum(grad_vec.device, grad_vec.dtype) if self.checksum_due(step) \
            else zero
        return torch.cat([rank_slots(grad_sq), rank_slots(checksum)])

    @torch.no_grad()
    def checksum(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Sum of the squared per-tensor norms of the replicated parameters (one foreach pass
        per dtype group; low-precision tensors are reduced in fp32 so a small change shows)."""
        total = torch.zeros((), dtype=dtype, device=device)
        for tdtype, tensors in self._groups:
            wide = torch.float32 if tdtype in (torch.float16, torch.bfloat16) else None
            norms = torch.stack(torch._foreach_norm(tensors, 2.0, dtype=wide))
            total = total + norms.to(device=device, dtype=dtype).square().sum()
        return total

    def decide(self, stats: StepStats, signals: Signals, ctx: PolicyContext, slots: list[float],
               step: int) -> Decision:
        """The step's decision (:func:`~finitetune.guard.policy.decide`) with this step's
        mismatch, if the reduced ``slots`` show one, folded in (:func:`resolve`)."""
        decision = decide(stats, signals, ctx, self.config)
        if not slots:
            return decision
        return resolve(decision, self.compare(slots, step), ctx, self.config)

    def compare(self, slots: list[float], step: int) -> dict[str, Any] | None:
        """The mismatch this step's reduced slots show, or None. Same result on every rank."""
        ws = len(slots) // 2
        checks = []
        if self.grads:
            checks.append(("grad_norm", [math.sqrt(v) if v >= 0 else v for v in slots[:ws]]))
        if self.checksum_due(step):
            checks.append(("params", slots[ws:]))
        for what, values in checks:
            if not all(math.isfinite(v) for v in values):
                continue  # non-finite values: the non-finite checks name those ranks
            found = odd_ranks(values, self.tolerance)
            if found is not None:
                ranks, reference = found
                return {"mismatch_in": what, "mismatch_ranks": ranks, "reference_rank": reference,
                        "rank_values": {str(r): values[r] for r in [reference, *ranks][:20]}}
        return None


def odd_ranks(values: list[float], tolerance: float) -> tuple[list[int], int] | None:
    """Ranks whose value differs from the majority's (relative ``tolerance``), and a rank of
    the majority; None when all agree. Without a strict majority (e.g. 2 ranks) the group of
    rank 0 is the reference: with two ranks nobody can tell which one is wrong, and the event
    says which one was compared with which."""
    groups: list[list[int]] = []
    for r, v in enumerate(values):
        for g in groups:
            ref = values[g[0]]
            if abs(v - ref) <= tolerance * max(abs(v), abs(ref)):
                g.append(r)
                break
        else:
            groups.append([r])
    if len(groups) == 1:
        return None
    reference = max(groups, key=lambda g: (len(g), -g[0]))
    odd = sorted(r for g in groups if g is not reference for r in g)
    return odd, reference[0]


def resolve(decision: Decision, mismatch: dict[str, Any] | None, ctx: PolicyContext,
            config: GuardConfig) -> Decision:
    """Fold a mismatch into the step's decision.

    A step already not applied for another reason keeps its action and reason (the mismatch is
    added to its event); otherwise ``config.rank_mismatch_action`` decides, and a skip that
    would be one too many in a row halts, as every other skip does.
    """
    if mismatch is None:
        return decision
    if decision.action != Action.APPLY:
        return Decision(decision.action, decision.reason, {**decision.detail, **mismatch})
    action = _ACTION[RankMismatchAction(config.rank_mismatch_action)]
    note = (f"rank(s) {mismatch['mismatch_ranks']} disagree with rank "
            f"{mismatch['reference_rank']} on {mismatch['mismatch_in']}")
    if action == Action.SKIP and ctx.consecutive_skips + 1 > config.max_consecutive_skips:
        action = Action.HALT
        note += f"; {ctx.consecutive_skips + 1} steps in a row not applied"
    return Decision(action, Reason.RANK_MISMATCH, {**mismatch, "note": note})

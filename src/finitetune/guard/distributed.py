"""Collectives the guard needs; no-ops when no process group is initialised.

The guard packs everything one optimizer step measured (gradient norm pieces, finite flags,
loss sums, token counts) into one small tensor, so a distributed run needs exactly one
all-reduce per step and every rank reaches the same decision (DESIGN.md §2.2). Flags travel as
*counts* and are reduced with SUM: a MAX/MIN over raw floats can drop a NaN on gloo, a SUM of
counts cannot.

Layout conventions the caller relies on (see ``Guard._reduce``):
- rank-local quantities (loss sums, token counts, empty micro-batches) are summed;
- gradient pieces are summed too; with replicated gradients (DDP, where every rank holds the
  same all-reduced gradients) the caller divides the gradient segment by ``world_size()``
  afterwards, while sharded gradients (FSDP) need the plain sum.
"""

from __future__ import annotations

import torch

__all__ = ["all_reduce_sum_", "is_distributed", "is_main_process", "world_size"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one rank."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def all_reduce_sum_(packed: torch.Tensor) -> torch.Tensor:
    """Sum ``packed`` over all ranks in place and return it; unchanged without a process group.

    One collective per call. It blocks until every rank arrives, so every rank must call it the
    same number of times per step (the guard calls it once, or twice on the rare +inf path on
    every rank alike, because the decision to take that path is made on reduced numbers).
    """
    if is_distributed():
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
    return packed


def is_main_process() -> bool:
    """Rank 0, or True without a process group: the one rank that writes events and warnings."""
    return not is_distributed() or torch.distributed.get_rank() == 0

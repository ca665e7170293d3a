"""Is the training state finite? Checked once per checkpoint save, never per step.

A checkpoint is only as good as the state it holds: one inf weight (an update the guard did not
see, a bad load, a user's own code) makes every later step NaN, and a Trainer that saves it
and rotates out the older checkpoints (``save_total_limit``) leaves nothing to go back to. So
before a save, the trainable parameters and their optimizer state (what a checkpoint holds
besides frozen base weights) are checked in one fused pass (the grouped max-abs of
:mod:`finitetune.numerics.foreach`: no overflow for huge finite values), one host read; the names of the
non-finite tensors come from the same vector when the check fails.

Pure torch: used by the Trainer integration before ``_save_checkpoint`` and by the main job
before it writes ``final/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from finitetune.numerics.foreach import per_tensor_max_abs

__all__ = ["StateCheck", "check_state", "training_state"]


@dataclass
class StateCheck:
    """The result of :func:`check_state`."""

    finite: bool
    tensors: int
    """How many tensors were checked."""
    nonfinite: list[str] = field(default_factory=list)
    """Names of the non-finite tensors (``param`` or ``optimizer:<param>.<key>``), when not
    finite."""


def training_state(model: torch.nn.Module, optimizer: Any | None
                   ) -> tuple[list[str], list[torch.Tensor]]:
    """(names, tensors): the trainable parameters and every floating-point optimizer-state
    tensor (moments; not integer step counts). Local shards of DTensor parameters."""
    names, tensors = [], []
    param_name = {}
    for name, p in model.named_parameters():
        param_name[id(p)] = name
        if p.requires_grad:
            names.append(name)
            tensors.append(_local(p.detach()))
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    state = getattr(inner, "state", None) or {}
    for p, entries in state.items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                names.append(f"optimizer:{param_name.get(id(p), '?')}.{key}")
                tensors.append(_local(value.detach()))
    keep = [i for i, t in enumerate(tensors) if t.numel() > 0]
    return [names[i] for i in keep], [tensors[i] for i in keep]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def check_state(model: torch.nn.Module, optimizer: Any | None = None, *,
                collective: bool = True) -> StateCheck:
    """Check trainable parameters and optimizer state for NaN/inf.

    One grouped max-abs pass (:func:`finitetune.numerics.foreach.per_tensor_max_abs`). HOST SYNC: one
    read (save time only). Distributed, with ``collective``: when a process group is up, the
    count of non-finite tensors is all-reduced (COLLECTIVE: every rank must call it) so every
    rank refuses or saves alike; ``collective=False`` for a check on one rank only.
    """
    names, tensors = training_state(model, optimizer)
    maxes = per_tensor_max_abs(tensors)
    count = (~torch.isfinite(maxes)).sum().to(torch.int64)
    if collective and torch.distributed.is_available() and torch.distributed.is_initialized():
        count = count.to(_collective_device())
        torch.distributed.all_reduce(count)  # COLLECTIVE: SUM, so any rank's NaN counts
    if int(count.item()) == 0:  # HOST SYNC
        return StateCheck(True, len(tensors))
    bad = (~torch.isfinite(maxes)).tolist()  # fault path only
    return StateCheck(False, len(tensors), [n for n, b in zip(names, bad, strict=True) if b])


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

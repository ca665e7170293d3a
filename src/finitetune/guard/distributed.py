"""The guard's collective conventions: one packed SUM all-reduce per step, sharded vs replicated.

The guard packs everything one optimizer step measured (gradient norm pieces, finite-flag
counts, loss sums, token and micro-batch counts, one fault-flag slot per rank) into one small
float64 tensor, so a distributed run needs exactly **one** all-reduce per step and every rank
reads the same numbers, hence takes the same decision. Everything is reduced
with SUM: flags travel as *counts* (exact in float64), and NaN + x = NaN, so a NaN can never
vanish in the reduction. (A MAX/MIN over raw floats can drop a NaN depending on which rank holds
it, as seen on gloo.) After the reduce every rank holds the same vector, so no decision depends
on a value that is NaN on one rank and finite on another.

Layout conventions the caller relies on (see ``Guard.check``):

- rank-local quantities (loss sums, token and micro-batch counts, empty micro-batches) add up
  to the global ones;
- gradient pieces are summed too. Replicated gradients (DDP: every rank holds the same
  all-reduced gradients) are counted ``grad_replicas()`` times in that sum, so the caller
  divides the gradient segment by it; sharded gradients (FSDP2 ``fully_shard``: each rank holds
  a DTensor shard) need the plain sum, since squares of disjoint shards add up.

The process-group helpers themselves (``world_size``, ``all_reduce_sum_``, ...) live in
:mod:`finitetune.distributed`; every function here is a no-op without a process group too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from finitetune.distributed import rank, world_size
from finitetune.errors import ConfigError

__all__ = ["grad_replicas", "local_tensor", "rank_slots"]


_SLOTS: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}


def rank_slots(value: torch.Tensor) -> torch.Tensor:
    """A ``(world_size,)`` vector holding the 0-d ``value`` at this rank's index, 0 elsewhere.

    Appended to the packed vector, its SUM over ranks says *which* ranks saw something (e.g. a
    NaN in their local loss), at the cost of ``world_size`` floats in the same collective. The
    one-hot mask is built once per (rank, device, dtype); each call is one multiply, no sync.
    """
    key = (world_size(), rank(), value.device, value.dtype)
    onehot = _SLOTS.get(key)
    if onehot is None:
        onehot = torch.zeros(key[0], dtype=value.dtype, device=value.device)
        onehot[key[1]] = 1.0  # a fill kernel on a slice: no host-to-device copy
        _SLOTS[key] = onehot
    return onehot * value


# ---- sharded vs replicated gradients --------------------------------------------------------

def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place ops write the DTensor), else ``tensor``."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        shard: Any = tensor
        return shard.to_local()
    return tensor


def _is_fsdp1(model: torch.nn.Module | None, params: Iterable[torch.Tensor]) -> bool:
    if any(type(p).__name__ == "FlatParameter" for p in params):
        return True
    if model is None or not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def grad_replicas(model: torch.nn.Module | None, params: list[torch.Tensor]) -> int | None:
    """How many ranks hold each gradient element; ``None`` means every rank (replicated).

    - plain tensors (single process, DDP): ``None``, i.e. replicated on all ranks;
    - FSDP2 ``fully_shard`` (DTensor parameters): the product of the mesh dimensions the
      parameter is *replicated* over (1 for plain ``fully_shard``; the replica count for HSDP),
      times the ranks outside the mesh.

    Raises:
        ConfigError: FSDP1 (``FullyShardedDataParallel``: flat-parameter shards whose layout
            the guard does not read), or trainable parameters mixing DTensors and plain tensors
            or DTensors of different layouts (no single correction makes their norms add up).
    """
    if _is_fsdp1(model, params):
        raise ConfigError(
            "the gradient guard does not support FSDP1 (FullyShardedDataParallel): use FSDP2, "
            "i.e. torch.distributed.fsdp.fully_shard, or with the Trainer "
            "fsdp_config={'fsdp_version': 2}; or train with DDP."
        )
    dtensor = _dtensor_type()
    kinds = set()
    for p in params:
        if dtensor is not None and isinstance(p, dtensor):
            shard: Any = p  # a DTensor: device_mesh and placements exist
            mesh = shard.device_mesh
            replicas = math.prod(mesh.size(i) for i, pl in enumerate(shard.placements)
                                 if pl.is_replicate())
            kinds.add(replicas * max(1, world_size() // mesh.size()))
        else:
            kinds.add(None)
    if len(kinds) > 1:
        raise ConfigError(
            "the trainable parameters mix sharded (DTensor) and replicated gradients, or "
            "DTensors of different layouts; the guard needs one layout to add up the gradient "
            "norm. Apply fully_shard to the root module too (or to none of it, for DDP)."
        )
    return kinds.pop() if kinds else None

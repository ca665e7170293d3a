"""Collectives the guard and the main job need; every one is a no-op without a process group.

The guard packs everything one optimizer step measured (gradient norm pieces, finite-flag
counts, loss sums, token and micro-batch counts, one fault-flag slot per rank) into one small
float64 tensor, so a distributed run needs exactly **one** all-reduce per step and every rank
reads the same numbers, hence takes the same decision (DESIGN.md §2.2). Everything is reduced
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

Every function here can be called unconditionally from library code: without an initialised
process group (or with a world of one) it returns at once and launches nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from finitetune.errors import ConfigError

__all__ = [
    "AllRanksWindow", "all_gather_objects", "all_reduce_sum_", "barrier", "broadcast_object", "collective_device",
    "destroy",
    "grad_replicas", "is_distributed", "is_main_process", "launched_distributed", "local_tensor",
    "main_process_first", "rank", "rank_slots", "world_size",
]


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


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0, or True without a process group: the one rank that writes files and events."""
    return rank() == 0


def launched_distributed() -> bool:
    """True when a launcher (``torchrun``, ``accelerate launch``) started several processes.

    Read from ``WORLD_SIZE``, which both launchers set, so it works *before* the process group
    exists (the main job needs to know before it creates the run directory).
    """
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def all_reduce_sum_(packed: torch.Tensor) -> torch.Tensor:
    """Sum ``packed`` over all ranks in place and return it; unchanged without a process group.

    COLLECTIVE: one all-reduce. It blocks until every rank arrives, so every rank must call it
    the same number of times per step with a tensor of the same length (the guard calls it once
    per step, or twice on the rare +inf path on every rank alike, because the decision to take
    that path is made on reduced numbers).
    """
    if is_distributed():
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
    return packed


def collective_device() -> torch.device:
    """Where a tensor must live for this group's backend: CUDA for NCCL, else the CPU."""
    if is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def barrier() -> None:
    """COLLECTIVE: wait until every rank arrives (no-op without a process group)."""
    if is_distributed():
        torch.distributed.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """COLLECTIVE: rank ``src``'s picklable ``obj`` on every rank (``obj`` unchanged alone)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """COLLECTIVE: every rank's picklable ``obj``, in rank order (``[obj]`` alone)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (e.g. filling a shared cache).

    COLLECTIVE: one barrier on every rank. Rank 0 reaches its barrier even when its block
    raises, so the others never wait forever; they then run the block themselves and, as a
    rule, fail with the same error.
    """
    if not is_distributed():
        yield
        return
    if is_main_process():
        try:
            yield
        finally:
            torch.distributed.barrier()
    else:
        torch.distributed.barrier()
        yield


def destroy() -> None:
    """Tear down the default process group if one exists, so the process exits cleanly."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class AllRanksWindow:
    """A ``SafeCausalLMLoss`` tracker's logging window summed over all ranks (``metrics.jsonl``).

    ``SafeCausalLMLoss`` records its own rank's micro-batches; rank 0 alone would log the loss
    of its shard of the batch. ``MetricsCallback`` reads the window on every rank (the Trainer
    calls ``on_log`` everywhere), so this adds one COLLECTIVE per *log* (not per step) and rank
    0 logs the token-mean loss and token count of the whole global batch. Without a process
    group it is the tracker's own ``read_and_reset``.
    """

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def read_and_reset(self) -> dict[str, Any]:
        """The tracker's ``read_and_reset`` dict, with the sums taken over all ranks."""
        if not is_distributed():
            return self.tracker.read_and_reset()
        w = self.tracker.window()
        device = collective_device()
        packed = torch.stack([t.detach().to(device=device, dtype=torch.float64).reshape(())
                              for t in (w.loss_sum, w.num_tokens, w.empty_micro_batches)])
        loss_sum, tokens, empty = all_reduce_sum_(packed).tolist()  # HOST SYNC
        self.tracker.reset()
        n = round(tokens)
        return {"loss": loss_sum / n if n > 0 else None, "loss_sum": loss_sum,
                "num_tokens": n, "empty_micro_batches": round(empty),
                "micro_batches": w.micro_batches * world_size(),
                "num_items_in_batch": None}


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
        return tensor.to_local()
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
            mesh = p.device_mesh
            replicas = math.prod(mesh.size(i) for i, pl in enumerate(p.placements)
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

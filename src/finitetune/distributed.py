"""Process-group helpers shared by the main job, the metrics writer and the guard.

Every function is a no-op without an initialised process group (or with a world of one), so
library code can call them unconditionally. The guard's own collective conventions (one SUM
all-reduce per step, flags as counts, sharded vs replicated gradients) are in
:mod:`finitetune.guard.distributed`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "AllRanksWindow", "all_gather_objects", "all_reduce_sum_", "barrier", "broadcast_object",
    "collective_device", "destroy", "is_distributed", "is_main_process", "launched_distributed",
    "main_process_first", "rank", "world_size",
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

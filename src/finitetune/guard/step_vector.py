"""The one small tensor a guarded step reduces and reads: its layout, and how to read it back.

Layout (float64, same length on every rank whatever gradients or losses exist, so the one SUM
all-reduce lines up everywhere)::

    GRAD_FIELDS | LOSS_FIELDS | [scaler found_inf] | [one fault-flag slot per rank]
        | [cross-rank check slots: 2 per rank]

:func:`pack` builds it on the device (no sync); the guard all-reduces it and reads it with one
host sync; :func:`split` and :func:`read_stats` turn the reduced numbers, identical on every
rank, into the :class:`~finitetune.guard.policy.StepStats` the pure decision takes, and into the
event's per-rank lists.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from finitetune import distributed
from finitetune.guard.distributed import rank_slots
from finitetune.guard.policy import FP32_MAX, StepStats
from finitetune.guard.stats import GRAD_FIELDS, LOSS_FIELDS

__all__ = ["pack", "rank_flags", "rank_lists", "read_stats", "scaler_found_inf", "split"]

_RANK_FLAGS = {1: "nonfinite_grad_ranks", 2: "nonfinite_loss_ranks", 4: "empty_ranks"}


def scaler_found_inf(scaler: Any, optimizer: torch.optim.Optimizer, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """GradScaler's own inf/NaN check of this step, reused (no second pass)."""
    found = scaler._found_inf_per_device(optimizer)  # private torch API
    total = torch.zeros(1, dtype=dtype, device=device)
    for value in found.values():
        total = total + value.to(device=device, dtype=total.dtype)
    return total


def rank_flags(grad_vec: torch.Tensor, loss_vec: torch.Tensor) -> torch.Tensor:
    """This rank's local findings as a bitmask (1 grad NaN/inf, 2 loss NaN/inf, 4 no tokens).

    Device-side, no sync; distributed runs only. Rides in the packed vector so the event can
    say which rank had the NaN, although the decision itself is global.
    """
    at = {name: i for i, name in enumerate(LOSS_FIELDS)}
    grad_bad = (grad_vec[GRAD_FIELDS.index("nan_norms")]
                + grad_vec[GRAD_FIELDS.index("inf_norms")]) > 0
    loss_bad = loss_vec[at["loss_nonfinite"]] > 0
    known, micro = loss_vec[at["tokens_known"]], loss_vec[at["micro_batches"]]
    empty = (micro > 0) & (known == micro) & (loss_vec[at["tokens"]] == 0)
    dtype = grad_vec.dtype
    return grad_bad.to(dtype) + 2 * loss_bad.to(dtype) + 4 * empty.to(dtype)


def rank_lists(slots: list[float]) -> dict[str, Any]:
    """Decode the reduced per-rank slots into the event's rank lists."""
    codes = [round(v) if math.isfinite(v) else 0 for v in slots]
    out: dict[str, Any] = {"rank": distributed.rank(), "world_size": len(codes)}
    for bit, key in _RANK_FLAGS.items():
        out[key] = [r for r, c in enumerate(codes) if c & bit]
    return out


def pack(grad_vec: torch.Tensor, loss_vec: torch.Tensor, found_inf: torch.Tensor | None,
         world_size: int, rank_check: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's vector in the layout above (``found_inf``: only with a GradScaler; the
    per-rank slots: only when ``world_size > 1``; ``rank_check``: the
    :class:`~finitetune.guard.rank_check.RankCheck` slots, when active). Device-side, no sync."""
    parts = [grad_vec, loss_vec]
    if found_inf is not None:
        parts.append(found_inf)
    if world_size > 1:
        parts.append(rank_slots(rank_flags(grad_vec, loss_vec)))
    if rank_check is not None:
        parts.append(rank_check)
    return torch.cat(parts)


def split(values: list[float], world_size: int, rank_check: int = 0
          ) -> tuple[list[float], dict[str, Any] | None, list[float]]:
    """The reduced values without the per-rank slots, those slots decoded (or None), and the
    last ``rank_check`` values (the cross-rank check's slots)."""
    tail = values[len(values) - rank_check:] if rank_check else []
    values = values[:len(values) - rank_check]
    if world_size <= 1:
        return values, None, tail
    return (values[:len(values) - world_size], rank_lists(values[len(values) - world_size:]),
            tail)


def read_stats(values: list[float], *, grad_div: int, replicated_grads: bool,
               has_scaler: bool, inspect_inf: Callable[[], torch.Tensor]
               ) -> tuple[StepStats, float]:
    """Turn the reduced vector (identical on every rank) into this step's ``StepStats``.

    ``values``: :func:`split`'s first part. ``grad_div``: ranks that hold each gradient element
    (the reduced gradient segment over-counts by this). ``inspect_inf``: the gradient stats'
    fault-path probe. Returns the stats and the clip norm as a number.

    Only reduced numbers are read here, never a rank-local count, so every rank builds the
    same stats and :func:`~finitetune.guard.policy.decide` takes the same decision everywhere.
    """
    g = dict(zip(GRAD_FIELDS, values, strict=False))
    lo = dict(zip(LOSS_FIELDS, values[len(GRAD_FIELDS):], strict=False))
    div = grad_div
    if div > 1:  # counts / div stay > 0 iff some rank counted one: the flags survive
        g = {k: v / div for k, v in g.items()}
    if not replicated_grads:  # summed shard norms mean nothing; the total does
        g["clip_norm"] = math.sqrt(g["grad_sq"]) if g["grad_sq"] >= 0 else g["grad_sq"]
    nonfinite = g["nan_norms"] > 0
    overflow = False
    grad_norm = math.sqrt(g["grad_sq"]) if math.isfinite(g["grad_sq"]) else g["grad_sq"]
    if nonfinite:
        grad_norm = math.nan
    elif g["inf_norms"] > 0:
        # Fault path only: an inf per-tensor norm is an inf element or an fp32 overflow.
        # COLLECTIVE + HOST SYNC (second ones, on this fault path only, on every rank
        # alike: the branch was taken on reduced numbers)
        probe = distributed.all_reduce_sum_(inspect_inf())
        inf_elems, sq64 = probe.tolist()
        sq64 /= div
        nonfinite = inf_elems > 0
        overflow = not nonfinite
        grad_norm = math.inf if nonfinite or sq64 <= 0 else math.sqrt(sq64)
    else:
        overflow = g["grad_sq"] > FP32_MAX or not math.isfinite(g["clip_norm"])
        if not overflow:  # report the fp32 norm clip_grad_norm_ itself would return
            grad_norm = g["clip_norm"]
    # micro-batch counts over all ranks (reduced, so a rank that observed nothing agrees)
    micro = round(lo["micro_batches"])
    weight, raw = lo["loss_weight"], lo["loss_raw_sum"]
    loss = None
    if micro and weight > 0:
        # Window-normalized shares add up to each rank's step loss; ranks are averaged, as
        # the Trainer's logged loss is (the Trainer multiplies each share by the world size
        # when num_items_in_batch is global, so this is the token mean of all ranks' batch).
        # Per-token means are weighted by their tokens.
        ws = distributed.world_size()
        loss = raw / ws if lo["window_normalized"] > 0 else raw / weight
    tokens = None
    if micro and round(lo["tokens_known"]) == micro:
        tokens = round(lo["tokens"])
    scaler_overflow = has_scaler and values[-1] > 0
    stats = StepStats(
        grad_norm=grad_norm, grad_nonfinite=nonfinite, norm_overflow=overflow, loss=loss,
        loss_nonfinite=lo["loss_nonfinite"] > 0, tokens=tokens, micro_batches=micro,
        empty_micro_batches=round(lo["empty"]), scaler_overflow=scaler_overflow,
    )
    return stats, g["clip_norm"]

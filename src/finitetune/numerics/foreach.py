"""Grouped ``torch._foreach_*`` passes: one fused kernel per (device, dtype) group of tensors.

The guard's fault path, the fault replay, the weight scan of the precision policy and the
checkpoint health check all ask "what is the largest |x| of each of these tensors?". Asking it
tensor by tensor costs one kernel (and, read naively, one host sync) per parameter; grouping
costs one kernel per group and leaves the result on the device, so the caller decides when to
read it (one sync).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def per_tensor_max_abs(tensors: Sequence[torch.Tensor],
                       device: torch.device | None = None) -> torch.Tensor:
    """float32 vector of ``max |t|`` per tensor, in order, on ``device`` (default: the first
    tensor's). No host sync. NaN anywhere in a tensor gives NaN; an empty tensor (e.g. an empty
    FSDP shard, where the inf-norm is an error) gives 0.
    """
    if not tensors:
        return torch.zeros(0, device=device)
    device = device if device is not None else tensors[0].device
    out = torch.zeros(len(tensors), dtype=torch.float32, device=device)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel():
            groups.setdefault((t.device, t.dtype), []).append(i)
    with torch.no_grad():
        for idx in groups.values():
            group = [tensors[i].detach() for i in idx]
            norms: Sequence[torch.Tensor]
            try:
                norms = torch._foreach_norm(group, math.inf)  # NaN stays NaN
            except (RuntimeError, TypeError, NotImplementedError):  # a dtype without a foreach
                norms = [t.abs().amax() for t in group]
            values = torch.stack([n.float() for n in norms]).to(device)
            out[torch.tensor(idx, device=device)] = values
    return out


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-d bool tensor: every element of every floating-point tensor is finite. No host sync."""
    floats = [t for t in tensors if t.is_floating_point()]
    if not floats:
        return torch.ones((), dtype=torch.bool)
    return per_tensor_max_abs(floats).isfinite().all()

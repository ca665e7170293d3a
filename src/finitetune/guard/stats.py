"""The numbers the guard reads once per optimizer step, computed without reading any on the host.

:class:`GradStats` makes one fused pass over the gradients: ``torch._foreach_norm`` per
(device, dtype) group, exactly as ``torch.nn.utils.get_total_norm`` does, so the clip norm is
bit-identical to ``clip_grad_norm_``'s and clipping with it reproduces ``clip_grad_norm_``
exactly. From the per-tensor norms (a few hundred numbers, not the gradients) it derives, still
on the device: the squared total in float64 (an fp32 square can overflow where fp64 does not:
that is how ``norm_overflow`` is told apart), and counts of NaN and +inf per-tensor norms.

:class:`LossAccumulator` sums what ``observe_loss`` is fed per micro-batch, on the device.

Both produce small float64 vectors that the guard concatenates, reduces across ranks (one
collective) and reads with one host sync.
"""

from __future__ import annotations

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from finitetune.guard.distributed import local_tensor
from finitetune.numerics.foreach import per_tensor_max_abs

__all__ = ["GRAD_FIELDS", "LOSS_FIELDS", "GradStats", "LossAccumulator", "acc_dtype"]

GRAD_FIELDS = ("grad_sq", "nan_norms", "inf_norms", "clip_norm")
"""Layout of :meth:`GradStats.compute`'s vector."""

LOSS_FIELDS = ("loss_sum", "loss_raw_sum", "loss_weight", "loss_nonfinite", "tokens", "empty",
               "micro_batches", "tokens_known", "window_normalized")
"""Layout of :meth:`LossAccumulator.packed`'s vector. The last three are counts of micro-batches
(all, with a token count, window-normalized): on the device so that, reduced across ranks, they
tell every rank the same thing even when one rank observed nothing this step."""


def acc_dtype(device: torch.device) -> torch.dtype:
    """float64 for the packed statistics, except where the device has none (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


class GradStats:
    """Pre-clip total norm and finiteness of a fixed list of parameters' gradients.

    The grouping by (device, dtype) is computed once; each step only collects the ``.grad``
    attributes (they are new tensors after ``zero_grad(set_to_none=True)``). Kernel launches
    per step: one ``_foreach_norm`` per group plus a handful of reductions over the per-tensor
    norms, independent of the number of parameters. No host sync.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("the guard found no trainable parameter (requires_grad=True)")
        self.device = self.params[0].device
        self.dtype = acc_dtype(self.device)
        # FSDP2 (fully_shard): DTensor gradients; the norms are taken over the local shards
        # (the guard adds the squares up across ranks) and clipping scales the shards in place.
        self.sharded = any(local_tensor(p) is not p for p in self.params)
        optional: list[torch.Tensor | None] = list(self.params)  # the type torch declares
        grouped = _group_tensors_by_device_and_dtype([optional])  # same order torch uses
        self.groups: list[tuple[torch.device, torch.dtype, list[torch.Tensor]]] = [
            (device, dtype, [t for t in tensors if t is not None])
            for (device, dtype), ([tensors], _) in grouped.items()
        ]
        self._grads: list[tuple[torch.device, list[torch.Tensor]]] = []
        self.norms: torch.Tensor | None = None
        """This step's per-tensor norms (device), in the order of the gradients it holds; None
        when some trainable parameter has no gradient (per-tensor clipping then sits out)."""

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (``GRAD_FIELDS`` vector in float64, clip norm tensor). No host sync.

        The clip norm is the float32 total exactly as ``get_total_norm`` computes it; the
        vector carries it too so the host knows whether clipping is needed at all.
        """
        self._grads = []
        self.norms = None
        norms = []
        for device, dtype, params in self.groups:
            grads = [g for g in (p.grad for p in params) if g is not None]
            if not grads:
                continue
            if self.sharded:
                grads = [local_tensor(g) for g in grads]
            if dtype == torch.float16:  # an fp16 norm saturates at 65504: accumulate in fp32
                per_tensor = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
            else:
                per_tensor = torch._foreach_norm(grads, 2.0)
            norms.append(torch.stack(per_tensor).to(self.device))
            self._grads.append((device, grads))
        if not norms:
            zero = torch.zeros((), device=self.device)
            return torch.zeros(len(GRAD_FIELDS), dtype=self.dtype, device=self.device), zero
        vec = norms[0] if len(norms) == 1 else torch.cat(norms)
        if len(vec) == len(self.params):
            self.norms = vec
        clip_norm = torch.linalg.vector_norm(vec, 2.0)
        v = vec.to(self.dtype)
        packed = torch.stack([
            (v * v).sum(), v.isnan().sum().to(self.dtype), v.isinf().sum().to(self.dtype),
            clip_norm.to(self.dtype),
        ])
        return packed, clip_norm

    def inspect_inf(self) -> torch.Tensor:
        """Fault path only: [count of +-inf gradient *elements*, squared norm in float64].

        Called when some per-tensor fp32 norm read +inf: that is either an inf element or a
        finite tensor whose sum of squares overflows fp32. A max-abs pass tells them apart; the
        fp64 norm gives the true (finite) size for the event. Slow, but never on a clean step.
        """
        inf_elems = torch.zeros((), dtype=self.dtype, device=self.device)
        sq = torch.zeros((), dtype=self.dtype, device=self.device)
        for _, grads in self._grads:
            max_abs = per_tensor_max_abs(grads, device=self.device)
            inf_elems = inf_elems + max_abs.isinf().sum().to(self.dtype)
            if self.dtype == torch.float64:
                n64 = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float64))
                sq = sq + n64.to(self.device).square().sum()
        return torch.stack([inf_elems, sq])

    def clip_(self, max_norm: float, clip_norm: torch.Tensor) -> None:
        """Scale this step's gradients as ``clip_grads_with_norm_(params, max_norm, clip_norm)``.

        Same formula and kernels, so the result is bit-identical to ``clip_grad_norm_``.
        """
        coef = torch.clamp(max_norm / (clip_norm + 1e-6), max=1.0)
        for device, grads in self._grads:
            torch._foreach_mul_(grads, coef.to(device))

    def scale_(self, coef: torch.Tensor, max_norm: float) -> None:
        """Multiply each gradient by its factor in ``coef`` (one per tensor, in ``norms``'
        order), then cap the scaled total at ``max_norm`` (``inf``: no cap). Device-side: one
        ``_foreach_mul_`` per (device, dtype) group, no sync."""
        assert self.norms is not None
        if max_norm < float("inf"):
            total = torch.linalg.vector_norm(self.norms.float() * coef, 2.0)
            coef = coef * torch.clamp(max_norm / (total + 1e-6), max=1.0)
        start = 0
        for device, grads in self._grads:
            part = coef[start:start + len(grads)].to(device=device, dtype=grads[0].dtype)
            torch._foreach_mul_(grads, list(part.unbind()))
            start += len(grads)

    def release(self) -> None:
        """Drop the references to this step's gradients (so ``zero_grad`` can free them)."""
        self._grads = []
        self.norms = None


_COUNTS: dict[tuple[bool, bool, torch.device, torch.dtype], torch.Tensor] = {}


def _counts(known: bool, normalized: bool, device: torch.device, dtype: torch.dtype
            ) -> torch.Tensor:
    """[1, known, normalized] as a cached device tensor (built once: no copy per micro-batch)."""
    key = (known, normalized, device, dtype)
    if key not in _COUNTS:
        _COUNTS[key] = torch.tensor([1.0, float(known), float(normalized)], dtype=dtype,
                                    device=device)
    return _COUNTS[key]


class LossAccumulator:
    """Device-side sums of the micro-batch losses and token counts of one optimizer step.

    Each :meth:`add` launches a dozen tiny kernels and never syncs. A micro-batch with zero
    supervised tokens is counted as empty and its loss (0.0 with a safe loss, NaN with a plain
    mean) is left out: it contributed no gradient, so it is not a fault.
    """

    def __init__(self) -> None:
        self._acc: torch.Tensor | None = None
        self.micro_batches = 0
        self.tokens_known = 0
        self.window_normalized: bool | None = None

    def add(
        self, loss: torch.Tensor | float, num_tokens: torch.Tensor | int | None,
        window_normalized: bool,
    ) -> None:
        if self.window_normalized is None:
            self.window_normalized = window_normalized
        elif self.window_normalized != window_normalized:
            raise ValueError("observe_loss: do not mix window_normalized True and False in a step")
        if isinstance(loss, torch.Tensor):
            device = loss.device if self._acc is None else self._acc.device
            value = loss.detach().reshape(()).to(device=device, dtype=acc_dtype(device))
        else:  # a Python number: a fill kernel, no host-to-device copy
            device = torch.device("cpu") if self._acc is None else self._acc.device
            value = torch.full((), float(loss), dtype=acc_dtype(device), device=device)
        dtype = value.dtype
        finite = torch.isfinite(value)
        if num_tokens is None:
            valid = torch.ones((), dtype=torch.bool, device=device)
            n = torch.zeros((), dtype=dtype, device=device)
            weight = torch.ones((), dtype=dtype, device=device)
        else:
            if isinstance(num_tokens, torch.Tensor):
                n = num_tokens.detach().reshape(()).to(device=device, dtype=dtype)
            else:
                n = torch.full((), float(num_tokens), dtype=dtype, device=device)
            valid = n > 0
            weight = torch.ones_like(n) if window_normalized else n
            self.tokens_known += 1
        lw = value * weight
        contrib = torch.cat([torch.stack([
            torch.where(valid & finite, lw, 0.0), torch.where(valid, lw, 0.0),
            torch.where(valid, weight, 0.0), (valid & ~finite).to(dtype), n,
            (~valid).to(dtype),
        ]), _counts(num_tokens is not None, window_normalized, device, dtype)])
        self._acc = contrib if self._acc is None else self._acc + contrib
        self.micro_batches += 1

    def packed(self, device: torch.device) -> torch.Tensor:
        """``LOSS_FIELDS`` vector on ``device`` (zeros when nothing was observed). No sync."""
        if self._acc is None:
            return torch.zeros(len(LOSS_FIELDS), dtype=acc_dtype(device), device=device)
        return self._acc.to(device=device, dtype=acc_dtype(device))

    def reset(self) -> None:
        self._acc = None
        self.micro_batches = 0
        self.tokens_known = 0
        self.window_normalized = None

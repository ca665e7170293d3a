"""Summed cross-entropy over row chunks: large vocabularies without (tokens, vocab) fp32 copies.

``causal_lm_loss(..., chunk_size=N)`` uses it instead of one fused ``F.cross_entropy`` call,
which holds several (tokens, vocab) fp32 tensors (the upcast logits, the softmax for backward).
Same masking rules as the rest of the loss: masked rows are dropped with ``torch.where`` /
``masked_fill``, never multiplied by 0 (NaN x 0 = NaN), and nothing is read on the host (the
loops run over shapes only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["ChunkedCrossEntropy"]


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy (+ z-loss) over row chunks, without an (N, V) fp32 intermediate.

    Forward keeps only the per-row logsumexp; backward recomputes the softmax chunk by chunk,
    straight into the gradient buffer (or through one reused fp32 chunk buffer for bf16/fp16
    logits). Peak extra memory: that gradient (which autograd needs anyway) plus one
    (chunk_size, V) buffer, instead of several (N, V) fp32 tensors. Reusing the buffer also
    spares the allocator (and the OS page faults) one large allocation per chunk.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
        chunk_size: int, z_loss: float, compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        n, vocab = logits.shape
        lse = torch.empty(n, dtype=compute_dtype, device=logits.device)
        total = torch.zeros((), dtype=compute_dtype, device=logits.device)
        buf = torch.empty(min(chunk_size, n), vocab, dtype=compute_dtype, device=logits.device)
        for start in range(0, n, chunk_size):  # host loop over shapes only, no sync
            end = min(start + chunk_size, n)
            x, work = logits[start:end], buf[: end - start]
            # logsumexp by hand in the reused buffer; an infinite max is handled as
            # torch.logsumexp does (all -inf -> -inf, any +inf -> inf), not as inf - inf = NaN.
            m = x.amax(dim=-1, keepdim=True).to(compute_dtype)
            m = torch.where(m.isinf(), 0.0, m)
            torch.sub(x, m, out=work)
            chunk_lse = work.exp_().sum(dim=-1).log_().add_(m.squeeze(1))
            picked = x.gather(1, targets[start:end, None]).squeeze(1).to(compute_dtype)
            token_loss = chunk_lse - picked
            if z_loss:
                token_loss = token_loss + z_loss * chunk_lse.square()
            # where, not multiply: a NaN at a masked position must not leak into the sum.
            total = total + torch.where(valid[start:end], token_loss, 0.0).sum()
            lse[start:end] = chunk_lse
        ctx.save_for_backward(logits, targets, valid, lse)
        ctx.chunk_size, ctx.z_loss, ctx.compute_dtype = chunk_size, z_loss, compute_dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, targets, valid, lse = ctx.saved_tensors
        (n, vocab), rows, dtype = logits.shape, min(ctx.chunk_size, logits.shape[0]), ctx.compute_dtype
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        direct = logits.dtype == dtype  # fp32 (or fp64) logits: compute in grad itself
        buf = None if direct else torch.empty(rows, vocab, dtype=dtype, device=logits.device)
        minus_one = torch.full((rows, 1), -1.0, dtype=dtype, device=logits.device)
        scale = grad_total.to(dtype)  # stays a device tensor: no sync
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            work = grad[start:end] if buf is None else buf[: end - start]
            chunk_lse = lse[start:end, None]
            torch.sub(logits[start:end], chunk_lse, out=work).exp_()  # softmax
            if ctx.z_loss:  # d(z * lse^2)/dx = 2 z lse softmax
                work.mul_(1.0 + 2.0 * ctx.z_loss * chunk_lse)
            work.scatter_add_(1, targets[start:end, None], minus_one[: end - start])
            work.mul_(scale)
            work.masked_fill_(~valid[start:end, None], 0.0)  # exact zeros, even where NaN
            if not direct:
                grad[start:end].copy_(work)
        return grad, None, None, None, None, None

"""Summed cross-entropy over row chunks: large vocabularies without (tokens, vocab) fp32 copies.

``causal_lm_loss(..., chunk_size=N)`` uses :class:`ChunkedCrossEntropy` instead of one fused
``F.cross_entropy`` call, which holds several (tokens, vocab) fp32 tensors (the upcast logits,
the softmax for backward). The two per-chunk steps, :func:`chunk_logsumexp` and
:func:`ce_grad_`, are shared with the LM-head loss of
:mod:`finitetune.loss.chunked_head`, which makes its logits chunk by chunk from hidden states.

Same masking rules as the rest of the loss: masked rows are dropped with ``torch.where`` /
``masked_fill``, never multiplied by 0 (NaN x 0 = NaN), and nothing is read on the host (the
loops run over shapes only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["ChunkedCrossEntropy", "ce_grad_", "chunk_logsumexp"]


def chunk_logsumexp(x: torch.Tensor, work: torch.Tensor, *, softmax: bool = False) -> torch.Tensor:
    """Row-wise logsumexp of ``x`` (rows, V), computed in ``work`` (same shape, compute dtype).

    ``work`` is overwritten: it ends up holding ``exp(x - max)``, or with ``softmax=True`` the
    row softmax of ``x`` (one division, instead of a second ``exp`` pass later). ``x`` may be
    ``work`` itself. An infinite row maximum is handled as ``torch.logsumexp`` does (all -inf ->
    -inf, any +inf -> inf), not as inf - inf = NaN.
    """
    m = x.amax(dim=-1, keepdim=True).to(work.dtype)
    m = torch.where(m.isinf(), 0.0, m)
    torch.sub(x, m, out=work)
    total = work.exp_().sum(dim=-1, keepdim=True)
    lse = total.log().add_(m).squeeze(1)
    if softmax:
        work.div_(total)
    return lse


def ce_grad_(
    probs: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, z_loss: float,
    scale: torch.Tensor | float, minus_one: torch.Tensor,
) -> torch.Tensor:
    """Turn the softmax ``probs`` (rows, V) in place into d(summed CE + z-loss)/d(logits) x
    ``scale``.

    ``lse``: the rows' logsumexp, shape (rows,); ``minus_one``: a (>= rows, 1) tensor of -1 in
    ``probs``' dtype (the one-hot part, reused across chunks); ``scale``: the incoming gradient
    (a device tensor: no sync) or a constant.
    """
    if z_loss:  # d(z * lse^2)/dx = 2 z lse softmax
        probs.mul_(1.0 + 2.0 * z_loss * lse[:, None])
    probs.scatter_add_(1, targets[:, None], minus_one[: probs.shape[0]])
    if not (isinstance(scale, float) and scale == 1.0):
        probs.mul_(scale)
    return probs


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
            x = logits[start:end]
            chunk_lse = chunk_logsumexp(x, buf[: end - start])
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
            torch.sub(logits[start:end], lse[start:end, None], out=work).exp_()  # softmax
            ce_grad_(work, lse[start:end], targets[start:end], ctx.z_loss, scale, minus_one)
            work.masked_fill_(~valid[start:end, None], 0.0)  # exact zeros, even where NaN
            if not direct:
                grad[start:end].copy_(work)
        return grad, None, None, None, None, None

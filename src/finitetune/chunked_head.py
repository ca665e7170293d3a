"""Summed cross-entropy of an LM head applied to selected hidden states, one chunk at a time.

``causal_lm_loss_from_hidden`` hands this function only the hidden states of supervised
positions, so the head's matmul runs on those rows alone. Rows are processed in chunks: each
chunk's logits exist only in one reused (chunk, vocab) buffer, in forward and in backward, never
as a (rows, vocab) tensor. Forward keeps the per-row logsumexp; backward recomputes the chunk's
logits (one more matmul, the price of not storing them), turns them into the softmax gradient
with the same per-chunk step as :class:`~finitetune.chunked_cross_entropy.ChunkedCrossEntropy`,
and multiplies it back through the head. What the head may be (all optional but the weight):

- ``weight`` (V, H) and ``bias`` (V,): ``nn.Linear``'s ``x @ W.T + b``;
- a low-rank term ``u @ B.T`` with ``u`` (rows, r) and ``B`` (V, r): a LoRA adapter on the head
  (``u`` = scaled ``lora_A(dropout(x))``, computed by the caller under ordinary autograd);
- ``scale``: logits multiplied by a constant (Cohere's ``logit_scale``, Granite's
  ``1 / logits_scaling``);
- ``softcap``: ``cap * tanh(logits / cap)`` after scaling (Gemma 2/3's
  ``final_logit_softcapping``).

Matmuls run in the weight's dtype, the log-softmax in fp32 (fp64 for fp64 weights). Gradients
are returned only for inputs that need them (a frozen head gets none, and no (V, H) buffer).
Nothing is read on the host: the loops run over shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from finitetune.chunked_cross_entropy import chunk_logsumexp, softmax_grad_

__all__ = ["ChunkedHeadCrossEntropy"]


class _Buffers:
    """The per-chunk scratch tensors, allocated once per forward / backward and reused."""

    def __init__(self, rows: int, vocab: int, mm_dtype: torch.dtype, dtype: torch.dtype,
                 device: torch.device, softcap: bool) -> None:
        self.work = torch.empty(rows, vocab, dtype=dtype, device=device)
        # matmul output in the weight's dtype when that is not the compute dtype (bf16 weights)
        self.mm = None if mm_dtype == dtype else torch.empty(rows, vocab, dtype=mm_dtype,
                                                             device=device)
        self.tanh = torch.empty(rows, vocab, dtype=dtype, device=device) if softcap else None


def _head_logits(
    bufs: _Buffers, rows: int, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    u: torch.Tensor | None, b_low: torch.Tensor | None, scale: float,
) -> torch.Tensor:
    """``(h @ W.T + b + u @ B.T) * scale`` for one chunk, in the fp32 work buffer (returned)."""
    work = bufs.work[:rows]
    out = work if bufs.mm is None else bufs.mm[:rows]
    h = h.to(weight.dtype)
    if bias is not None:
        torch.addmm(bias.to(weight.dtype), h, weight.t(), out=out)
    else:
        torch.mm(h, weight.t(), out=out)
    if u is not None and b_low is not None:
        out.addmm_(u.to(weight.dtype), b_low.to(weight.dtype).t())
    if bufs.mm is not None:
        work.copy_(out)
    if scale != 1.0:
        work.mul_(scale)
    return work


def _softcap_(work: torch.Tensor, cap: float, keep: torch.Tensor | None) -> None:
    """``work <- cap * tanh(work / cap)`` in place; ``keep`` (if given) receives the tanh."""
    work.div_(cap).tanh_()
    if keep is not None:
        keep.copy_(work)
    work.mul_(cap)


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Summed CE (+ z-loss) of ``softcap(scale * (h @ W.T + b + u @ B.T))`` against ``targets``.

    ``apply(h, targets, weight, bias, u, b_low, scale, softcap, z_loss, chunk_size)``: ``h``
    (N, H) hidden states of the supervised rows only, ``targets`` (N,) in-range token ids;
    ``bias``, ``u``/``b_low`` and ``softcap`` may be None. Returns a 0-d fp32 (fp64) sum.
    Peak extra memory: one (chunk_size, V) fp32 buffer (two with ``softcap`` in backward, plus
    one in the weight's dtype for bf16/fp16 weights) and the gradients autograd asks for.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
        bias: torch.Tensor | None, u: torch.Tensor | None, b_low: torch.Tensor | None,
        scale: float, softcap: float | None, z_loss: float, chunk_size: int,
    ) -> torch.Tensor:
        n, vocab = h.shape[0], weight.shape[0]
        dtype = torch.promote_types(weight.dtype, torch.float32)
        lse = torch.empty(n, dtype=dtype, device=h.device)
        total = torch.zeros((), dtype=dtype, device=h.device)
        if n:
            bufs = _Buffers(min(chunk_size, n), vocab, weight.dtype, dtype, h.device, False)
        for start in range(0, n, chunk_size):  # host loop over shapes only, no sync
            end = min(start + chunk_size, n)
            work = _head_logits(bufs, end - start, h[start:end], weight, bias,
                                None if u is None else u[start:end], b_low, scale)
            if softcap is not None:
                _softcap_(work, softcap, None)
            picked = work.gather(1, targets[start:end, None]).squeeze(1)  # before work is reused
            chunk_lse = chunk_logsumexp(work, work)
            token_loss = chunk_lse - picked
            if z_loss:
                token_loss = token_loss + z_loss * chunk_lse.square()
            total = total + token_loss.sum()  # every row is supervised: no mask needed
            lse[start:end] = chunk_lse
        ctx.save_for_backward(h, targets, weight, bias, u, b_low, lse)
        ctx.args = (scale, softcap, z_loss, chunk_size)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # One loop, five optional gradients: splitting it would mean passing a dozen buffers.
        h, targets, weight, bias, u, b_low, lse = ctx.saved_tensors
        scale, softcap, z_loss, chunk_size = ctx.args
        need_h, _, need_w, need_b, need_u, need_bl = ctx.needs_input_grad[:6]
        n, vocab = h.shape[0], weight.shape[0]
        dtype = lse.dtype
        grad_h = torch.empty_like(h) if need_h else None
        # a trainable head gets a gradient even from an empty batch (zeros): DDP expects every
        # parameter it saw in forward to receive one
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(vocab, dtype=dtype, device=h.device) if need_b else None
        grad_u = torch.empty_like(u) if need_u else None
        grad_bl = torch.zeros_like(b_low) if need_bl else None
        if n:
            rows = min(chunk_size, n)
            bufs = _Buffers(rows, vocab, weight.dtype, dtype, h.device, softcap is not None)
            minus_one = torch.full((rows, 1), -1.0, dtype=dtype, device=h.device)
            # d(logits)/d(raw head output) = scale (x (1 - tanh^2) with softcap)
            g_scale = grad_total.to(dtype) * scale  # a device tensor: no sync
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h_c = h[start:end].to(weight.dtype)
            u_c = None if u is None else u[start:end]
            work = _head_logits(bufs, end - start, h_c, weight, bias, u_c, b_low, scale)
            tanh = None if bufs.tanh is None else bufs.tanh[: end - start]
            if softcap is not None:
                _softcap_(work, softcap, tanh)
            softmax_grad_(work, work, lse[start:end], targets[start:end], z_loss, g_scale,
                          minus_one)
            if tanh is not None:
                work.mul_(tanh.square_().neg_().add_(1.0))
            if grad_b is not None:
                grad_b += work.sum(dim=0)
            g = work if bufs.mm is None else bufs.mm[: end - start].copy_(work)
            if grad_h is not None:
                grad_h[start:end] = g @ weight  # cast to h's dtype by the copy if they differ
            if grad_w is not None:
                grad_w.addmm_(g.t(), h_c)
            if grad_u is not None and b_low is not None:
                grad_u[start:end] = g @ b_low.to(g.dtype)
            if grad_bl is not None and u_c is not None:
                grad_bl.addmm_(g.t().to(b_low.dtype), u_c.to(b_low.dtype))
        if grad_b is not None and bias is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, None, grad_w, grad_b, grad_u, grad_bl, None, None, None, None

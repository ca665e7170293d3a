"""Summed cross-entropy of an LM head applied to selected hidden states, one chunk at a time.

``causal_lm_loss_from_hidden`` hands this function only the hidden states of supervised
positions, so the head's matmul runs on those rows alone. Rows are processed in chunks: each
chunk's logits exist only in one reused (chunk, vocab) buffer, never as a (rows, vocab) tensor.
While a chunk's logits are at hand, forward also turns them into the softmax gradient (the
per-chunk steps of :mod:`~finitetune.loss.chunked_cross_entropy`) and multiplies it back through the
head, so backward only scales the stored gradients: no logits are kept and none recomputed.
What the head may be (all optional but the weight):

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

from finitetune.loss.chunked_cross_entropy import ce_grad_, chunk_logsumexp

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


class _Grads:
    """Gradients of the summed loss (not yet times the incoming gradient), filled chunk by chunk
    in forward; None where not wanted."""

    def __init__(self, want: tuple[bool, ...], h: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, u: torch.Tensor | None,
                 b_low: torch.Tensor | None, dtype: torch.dtype) -> None:
        want_h, want_w, want_b, want_u, want_bl = want
        self.h = torch.empty_like(h) if want_h else None
        # a trained head gets a gradient even from an empty batch (zeros): DDP expects every
        # parameter it saw in forward to receive one
        self.w = torch.zeros_like(weight) if want_w else None
        self.b = torch.zeros(weight.shape[0], dtype=dtype, device=h.device) if (
            want_b and bias is not None) else None
        self.u = torch.empty_like(u) if want_u and u is not None else None
        self.bl = torch.zeros_like(b_low) if want_bl and b_low is not None else None

    def add_chunk(self, g: torch.Tensor, sl: slice, h_c: torch.Tensor, weight: torch.Tensor,
                  u_c: torch.Tensor | None, b_low: torch.Tensor | None) -> None:
        """``g``: d(loss)/d(raw head output) of one chunk, in the matmul dtype."""
        if self.h is not None:
            self.h[sl] = g @ weight  # the copy casts to h's dtype where it differs
        if self.w is not None:
            self.w.addmm_(g.t(), h_c)
        if self.u is not None and b_low is not None:
            self.u[sl] = g @ b_low.to(g.dtype)
        if self.bl is not None and u_c is not None and b_low is not None:
            self.bl.addmm_(g.t().to(b_low.dtype), u_c.to(b_low.dtype))

    def scaled(self, grad_total: torch.Tensor, bias_dtype: torch.dtype | None) -> tuple:
        """The gradients times the incoming one (a device tensor: no sync), in input order."""
        def mul(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.mul_(grad_total.to(t.dtype))
        b = None if self.b is None or bias_dtype is None else self.b.to(bias_dtype)
        return mul(self.h), mul(self.w), mul(b), mul(self.u), mul(self.bl)


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Summed CE (+ z-loss) of ``softcap(scale * (h @ W.T + b + u @ B.T))`` against ``targets``.

    ``apply(h, targets, weight, bias, u, b_low, scale, softcap, z_loss, chunk_size, want)``:
    ``h`` (N, H) hidden states of the supervised rows only, ``targets`` (N,) in-range token ids;
    ``bias``, ``u``/``b_low`` and ``softcap`` may be None; ``want``: which of (h, weight, bias,
    u, b_low) need a gradient (all False under ``no_grad``). Returns a 0-d fp32 (fp64) sum.

    The gradients are computed in forward, chunk by chunk, while each chunk's logits are at
    hand (as Liger's fused linear cross-entropy does), and only scaled in backward: the head's
    matmul is not recomputed, so the work is that of the plain head plus its backward, on the
    supervised rows. Peak extra memory: one (chunk_size, V) fp32 buffer (two with ``softcap``,
    plus one in the weight's dtype for bf16/fp16 weights) and the gradients autograd asks for.
    """

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
        bias: torch.Tensor | None, u: torch.Tensor | None, b_low: torch.Tensor | None,
        scale: float, softcap: float | None, z_loss: float, chunk_size: int,
        want: tuple[bool, ...],
    ) -> torch.Tensor:
        n, vocab = h.shape[0], weight.shape[0]
        dtype = torch.promote_types(weight.dtype, torch.float32)
        total = torch.zeros((), dtype=dtype, device=h.device)
        grads = _Grads(want, h, weight, bias, u, b_low, dtype) if any(want) else None
        if n:
            rows = min(chunk_size, n)
            bufs = _Buffers(rows, vocab, weight.dtype, dtype, h.device,
                            softcap is not None and grads is not None)
            minus_one = torch.full((rows, 1), -1.0, dtype=dtype, device=h.device)
        for start in range(0, n, chunk_size):  # host loop over shapes only, no sync
            end = min(start + chunk_size, n)
            h_c = h[start:end].to(weight.dtype)
            u_c = None if u is None else u[start:end]
            work = _head_logits(bufs, end - start, h_c, weight, bias, u_c, b_low, scale)
            tanh = None if bufs.tanh is None else bufs.tanh[: end - start]
            if softcap is not None:
                _softcap_(work, softcap, tanh)
            picked = work.gather(1, targets[start:end, None]).squeeze(1)  # before work is reused
            lse = chunk_logsumexp(work, work, softmax=grads is not None)
            token_loss = lse - picked
            if z_loss:
                token_loss = token_loss + z_loss * lse.square()
            total = total + token_loss.sum()  # every row is supervised: no mask needed
            if grads is None:
                continue
            g = ce_grad_(work, lse, targets[start:end], z_loss, scale, minus_one)
            if tanh is not None:  # d(cap * tanh(a / cap))/da = 1 - tanh^2
                g.mul_(tanh.square_().neg_().add_(1.0))
            if grads.b is not None:
                grads.b += g.sum(dim=0)
            if bufs.mm is not None:
                g = bufs.mm[: end - start].copy_(g)
            grads.add_chunk(g, slice(start, end), h_c, weight, u_c, b_low)
        ctx.grads, ctx.bias_dtype = grads, None if bias is None else bias.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # they were handed out (and scaled in place) by the first backward
            raise RuntimeError("backward ran twice through causal_lm_loss_from_hidden (e.g. "
                               "retain_graph=True): compute the loss again for a second one")
        g_h, g_w, g_b, g_u, g_bl = grads.scaled(grad_total, ctx.bias_dtype)
        return g_h, None, g_w, g_b, g_u, g_bl, None, None, None, None, None

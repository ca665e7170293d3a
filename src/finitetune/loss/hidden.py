"""The safe causal-LM loss computed from hidden states: the LM head only where a label is.

In supervised fine-tuning most positions are prompt or padding, yet a causal-LM forward applies
the head (hidden x vocab, the largest matmul of a small model) and a full log-softmax at every
position and then throws most of it away. :func:`causal_lm_loss_from_hidden` takes the final
hidden states instead of logits, gathers the positions whose *shifted* label is supervised (all
rows of the batch together), and applies the head only there, in chunks, through
:class:`~finitetune.loss.chunked_head.ChunkedHeadCrossEntropy`: no tensor of logits larger than one
chunk ever exists, in forward or backward.

The contract is :func:`~finitetune.loss.causal.causal_lm_loss`'s: token losses summed in fp32 and
divided by the window's supervised-token count (``num_items_in_batch``, clamped to >= 1), so
gradient accumulation and an empty micro-batch behave exactly as there (an exact 0.0 that stays
in the graph, zero gradients), and a NaN in a supervised position is still a NaN.

One difference: choosing the rows needs their number, a host read (``nonzero``). On CPU it is
free; on a GPU it is one sync per micro-batch, paid for a head matmul over a fraction of the
positions. This module knows nothing about transformers or PEFT: ``lm_head`` is an
``nn.Linear`` or an :class:`LMHead` (what :mod:`finitetune.integrations.hf.lm_head` builds from a
PEFT LoRA layer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from finitetune.loss.causal import LossParts, _denominator
from finitetune.loss.chunked_head import ChunkedHeadCrossEntropy
from finitetune.loss.targets import shifted_targets
from finitetune.numerics.constants import IGNORE_INDEX

__all__ = ["LMHead", "LowRank", "causal_lm_loss_from_hidden", "causal_lm_loss_from_hidden_parts",
           "default_chunk_rows"]

CHUNK_BYTES = 64 * 2**20
"""fp32 bytes of one chunk of logits when ``chunk_size`` is None (128 rows at vocab 128k)."""


class LowRank(NamedTuple):
    """One LoRA adapter on the head: adds ``scaling * B(A(dropout(x)))``."""

    a_weight: torch.Tensor
    """(r, H): ``lora_A``'s weight."""
    b_weight: torch.Tensor
    """(V, r): ``lora_B``'s weight."""
    scaling: float
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Applied to the hidden states before ``A`` (a ``nn.Dropout`` module; None = identity)."""


class LMHead(NamedTuple):
    """What the head computes: ``x @ weight.T + bias`` plus any low-rank adapters."""

    weight: torch.Tensor
    """(V, H). Frozen or trainable; a tied input embedding is fine (the gradient adds up)."""
    bias: torch.Tensor | None = None
    low_rank: tuple[LowRank, ...] = ()


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one chunk of fp32 logits is at most ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (4 * max(1, vocab)))


def _as_head(lm_head: torch.nn.Module | LMHead) -> LMHead:
    if isinstance(lm_head, LMHead):
        return lm_head
    if isinstance(lm_head, torch.nn.Linear) and type(lm_head).forward is torch.nn.Linear.forward:
        return LMHead(lm_head.weight, lm_head.bias)
    raise TypeError(
        f"lm_head must be a torch.nn.Linear or a finitetune.loss.hidden.LMHead, got "
        f"{type(lm_head).__module__}.{type(lm_head).__name__}. For a PEFT-wrapped head use "
        "finitetune.integrations.hf.lm_head.head_spec(module)."
    )


def _check(hidden: torch.Tensor, head: LMHead, target: torch.Tensor, name: str) -> None:
    """Shapes, dtypes and devices (metadata only, no sync)."""
    if not hidden.is_floating_point() or hidden.dim() < 2:
        raise TypeError(f"hidden_states must be a floating-point (..., seq, hidden) tensor, got "
                        f"dtype {hidden.dtype} with shape {tuple(hidden.shape)}.")
    if head.weight.dim() != 2 or head.weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head weight shape {tuple(head.weight.shape)} does not fit hidden "
                         f"states of size {hidden.shape[-1]}: expected (vocab, "
                         f"{hidden.shape[-1]}).")
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point \
            or target.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}.")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{name} shape {tuple(target.shape)} does not match hidden_states "
                         f"shape {tuple(hidden.shape)}: expected {tuple(hidden.shape[:-1])}.")
    for what, t in (("labels", target), ("lm_head weight", head.weight)):
        if t.device != hidden.device:
            raise ValueError(f"{what} are on {t.device} but hidden_states on {hidden.device}; "
                             "move them to the same device before calling the loss.")


def _options(chunk_size: int | None, z_loss: float, logit_softcap: float | None,
             logit_scale: float | None, vocab: int) -> tuple[int, float, float | None, float]:
    if chunk_size is None:
        chunk_size = default_chunk_rows(vocab)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    z_loss = float(z_loss)
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}.")
    if logit_softcap is not None and not float(logit_softcap) > 0.0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap}.")
    scale = 1.0 if logit_scale is None else float(logit_scale)
    if not scale == scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"logit_scale must be finite, got {logit_scale}.")
    return chunk_size, z_loss, None if logit_softcap is None else float(logit_softcap), scale


def _low_rank_input(rows: torch.Tensor, head: LMHead) -> tuple[torch.Tensor | None,
                                                               torch.Tensor | None]:
    """``u = cat_i(s_i * A_i(dropout_i(x)))`` and ``B = cat_i(B_i)``: every adapter as one term.

    ``u`` is (rows, sum r) and goes through ordinary autograd (so ``A`` gets its gradient);
    ``B`` is a (V, sum r) copy, small next to the head.
    """
    if not head.low_rank:
        return None, None
    us, bs = [], []
    for lr in head.low_rank:
        x = rows.to(lr.a_weight.dtype)
        if lr.dropout is not None:
            x = lr.dropout(x)
        us.append(F.linear(x, lr.a_weight) * lr.scaling)
        bs.append(lr.b_weight)
    if len(us) == 1:
        return us[0], bs[0]
    return torch.cat(us, dim=1), torch.cat(bs, dim=1)


def causal_lm_loss_from_hidden_parts(
    hidden_states: torch.Tensor, lm_head: torch.nn.Module | LMHead, labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | float | None = None, *, ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None, z_loss: float = 0.0, logit_softcap: float | None = None,
    logit_scale: float | None = None, shift_labels: torch.Tensor | None = None,
) -> LossParts:
    """:func:`causal_lm_loss_from_hidden` plus the summed loss and token count (for trackers)."""
    head = _as_head(lm_head)
    name, target = ("shift_labels", shift_labels) if shift_labels is not None else ("labels",
                                                                                    labels)
    if target is None:
        raise ValueError("labels is None: the loss needs labels (or shift_labels). With the "
                         "Trainer, make sure the collator puts 'labels' in each batch.")
    _check(hidden_states, head, target, name)
    chunk_size, z_loss, softcap, scale = _options(chunk_size, z_loss, logit_softcap,
                                                  logit_scale, head.weight.shape[0])
    if shift_labels is None:  # position t predicts label t+1; the last position predicts nothing
        target = shifted_targets(target, ignore_index)
    flat = target.reshape(-1).long()
    valid = flat != ignore_index
    num_tokens = valid.sum()
    # HOST SYNC on accelerators: the number of supervised rows sets the matmul's shape.
    index = valid.nonzero().squeeze(1)
    rows = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, index)
    u, b_low = _low_rank_input(rows, head)
    grad_on = torch.is_grad_enabled()  # gradients are made in forward: only if wanted
    want = tuple(grad_on and t is not None and t.requires_grad
                 for t in (rows, head.weight, head.bias, u, b_low))
    loss_sum = ChunkedHeadCrossEntropy.apply(
        rows, flat.index_select(0, index), head.weight, head.bias, u, b_low, scale, softcap,
        z_loss, chunk_size, want,
    )
    loss = loss_sum / _denominator(num_items_in_batch, num_tokens, loss_sum.device)
    return LossParts(loss=loss, loss_sum=loss_sum, num_tokens=num_tokens)


def causal_lm_loss_from_hidden(
    hidden_states: torch.Tensor, lm_head: torch.nn.Module | LMHead, labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | float | None = None, *, ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None, z_loss: float = 0.0, logit_softcap: float | None = None,
    logit_scale: float | None = None, shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy from final hidden states, the head applied only where supervised.

    Equal (fp32: to rounding) to ``causal_lm_loss(lm_head(hidden_states) ..., labels, ...)`` and
    to transformers' causal-LM loss where that one is defined, and 0.0 in the graph where it is
    NaN (nothing supervised). Usable from a plain loop::

        hidden = model.model(input_ids, attention_mask=mask).last_hidden_state
        loss = causal_lm_loss_from_hidden(hidden, model.lm_head, labels, num_items_in_batch=n)

    With the Trainer, :func:`finitetune.integrations.hf.hidden_loss.choose_loss` wires it in.

    Args:
        hidden_states: ``(..., seq, hidden)`` output of the base model (after its final norm).
        lm_head: ``nn.Linear`` (weight, optional bias; may be tied to the input embedding) or
            an :class:`LMHead` (e.g. with LoRA adapters).
        labels: token ids ``(..., seq)``, ``ignore_index`` where unsupervised; shifted here as
            transformers does (position t predicts label t+1).
        num_items_in_batch: supervised tokens of the whole accumulation window, all ranks (what
            the Trainer passes); ``None``: this batch's own count. Never read on the host.
        ignore_index: label value of unsupervised positions.
        chunk_size: supervised rows per chunk of logits; ``None``: as many as fit one 64 MiB
            fp32 chunk (:func:`default_chunk_rows`).
        z_loss: weight of ``logsumexp(logits)**2`` per supervised token; 0 disables it.
        logit_softcap: ``cap`` of ``cap * tanh(logits / cap)`` (Gemma 2/3's
            ``final_logit_softcapping``), applied after ``logit_scale``; None: none.
        logit_scale: constant the head's output is multiplied by (Cohere's ``logit_scale``;
            ``1 / logits_scaling`` for Granite); None: 1.
        shift_labels: already-shifted targets (then ``labels`` is ignored).

    Returns:
        A 0-d fp32 (fp64 for fp64 weights) tensor in the graph; gradients reach the hidden
        states, the head's weight and bias when they require grad, and LoRA adapters.
    """
    return causal_lm_loss_from_hidden_parts(
        hidden_states, lm_head, labels, num_items_in_batch, ignore_index=ignore_index,
        chunk_size=chunk_size, z_loss=z_loss, logit_softcap=logit_softcap,
        logit_scale=logit_scale, shift_labels=shift_labels,
    ).loss

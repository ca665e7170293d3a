"""Safe causal-LM loss: a token-weighted mean that is never NaN for lack of tokens.

The usual defaults fail three ways: mean cross-entropy over zero
supervised tokens is 0/0 = NaN; ``sum / num_items_in_batch`` is NaN when the whole accumulation
window is empty; a per-micro-batch mean lets a near-empty micro-batch weigh as much as a full
one. A detached ``tensor(0.0)`` for an empty batch is no fix: it has no graph, backward raises.

Here the token losses are *summed* (a sum over zero elements is exactly 0.0 and stays in the
graph) and divided by the supervised-token count of the whole window, clamped to at least 1.
No value is ever multiplied by a mask (NaN x 0 = NaN); masked positions are dropped with
``ignore_index`` / ``torch.where`` / ``masked_fill``. Nothing here reads a tensor value on the
host, so the loss never stalls the device queue.

``SafeCausalLMLoss`` wraps the function for ``Trainer(compute_loss_func=...)`` and keeps the
window's numbers as device tensors for the guard and the logger.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from finitetune._lazy import lazy_getattr
from finitetune.loss.chunked_cross_entropy import ChunkedCrossEntropy
from finitetune.loss.targets import shifted_targets
from finitetune.numerics.constants import IGNORE_INDEX

__all__ = ["LossParts", "LossWindow", "SafeCausalLMLoss", "causal_lm_loss", "causal_lm_loss_parts"]

# ``causal_lm_loss_from_hidden`` (the LM head only at supervised positions) is importable from
# here too; it lives in finitetune.loss.hidden (which builds on this module), resolved on use.
__getattr__ = lazy_getattr(
    "finitetune.loss.causal", {"causal_lm_loss_from_hidden": "finitetune.loss.hidden",
                        "causal_lm_loss_from_hidden_parts": "finitetune.loss.hidden"}, globals())


class LossParts(NamedTuple):
    """One micro-batch's loss and the numbers behind it (all tensors on the logits' device)."""

    loss: torch.Tensor
    """``loss_sum / denominator``: what to call ``backward()`` on (fp32, 0-d, in the graph)."""
    loss_sum: torch.Tensor
    """Summed token loss of this micro-batch (includes the z-loss term when enabled)."""
    num_tokens: torch.Tensor
    """Supervised (shifted) tokens in this micro-batch, int64, 0-d."""


def _logits_of(outputs: Any) -> torch.Tensor:
    """Accept a logits tensor, a ModelOutput / object with ``.logits`` or a mapping with 'logits'."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"causal_lm_loss expects a logits tensor or a model output with `.logits`, got "
        f"{type(outputs).__name__}. With return_dict=False pass `outputs[0]` (or `outputs[1]` "
        "when the model also returned a loss)."
    )


def _shifted_labels(
    logits: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None,
    ignore_index: int,
) -> torch.Tensor:
    """Validate shapes/devices/dtypes (metadata only, no sync) and return next-token targets."""
    if not logits.is_floating_point():
        raise TypeError(
            f"logits must be a floating-point tensor, got dtype {logits.dtype} with shape "
            f"{tuple(logits.shape)}; pass the model's logits, not token ids."
        )
    if logits.dim() < 2:
        raise ValueError(
            f"logits must have shape (..., seq_len, vocab), got shape {tuple(logits.shape)}."
        )
    name, target = ("shift_labels", shift_labels) if shift_labels is not None else ("labels", labels)
    if target is None:
        raise ValueError(
            "labels is None: causal_lm_loss needs labels (or shift_labels). With the Trainer, "
            "make sure the collator puts 'labels' in each batch."
        )
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}.")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer token ids, got dtype {target.dtype} with shape "
            f"{tuple(target.shape)}."
        )
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name} shape {tuple(target.shape)} does not match logits shape "
            f"{tuple(logits.shape)}: expected {name} of shape {tuple(logits.shape[:-1])} "
            "(logits minus the vocab dimension). Was the model called with logits_to_keep, "
            "or were labels padded differently from input_ids?"
        )
    if target.device != logits.device:
        raise ValueError(
            f"{name} are on {target.device} but logits are on {logits.device} "
            f"(shapes {tuple(target.shape)} and {tuple(logits.shape)}); move them with "
            f"`{name}.to(logits.device)` before calling the loss."
        )
    if shift_labels is not None:
        return shift_labels.long()
    return shifted_targets(target, ignore_index)  # as transformers' ForCausalLMLoss shifts


def _denominator(
    num_items_in_batch: torch.Tensor | int | float | None, num_tokens: torch.Tensor,
    device: torch.device,
) -> torch.Tensor | float:
    """Token count to divide by: the window's (all ranks') count if given, else the local one.

    A count of 0 becomes 1: the numerator is then a sum over zero tokens, exactly 0.0.
    """
    if num_items_in_batch is None:
        return num_tokens.clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a single count, got a tensor of shape "
                f"{tuple(num_items_in_batch.shape)} (torch.nn.DataParallel with n_gpu > 1 is "
                "not supported; use DistributedDataParallel / torchrun)."
            )
        # Trainer passes it on args.device; a same-device .to() is free. torch.where, not clamp,
        # so a fractional count (Trainer divides by tp/cp size) is kept as is when positive.
        n = num_items_in_batch.reshape(()).to(device)
        return torch.where(n > 0, n, torch.ones_like(n))
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int | float):
        raise TypeError(
            "num_items_in_batch must be an int, a float, a 0-d tensor or None, got "
            f"{type(num_items_in_batch).__name__}."
        )
    if num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}.")
    return num_items_in_batch if num_items_in_batch > 0 else 1


def causal_lm_loss_parts(
    outputs: Any, labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | float | None = None, *, ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None, z_loss: float = 0.0, shift_labels: torch.Tensor | None = None,
) -> LossParts:
    """``causal_lm_loss`` plus the summed loss and token count it was built from.

    For callers that must record the numbers (``SafeCausalLMLoss``, a guard in a plain loop)
    without computing the loss twice. Arguments as in ``causal_lm_loss``.
    """
    logits = _logits_of(outputs)
    targets = _shifted_labels(logits, labels, shift_labels, ignore_index)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    z_loss = float(z_loss)
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}.")
    # Upcast to at least fp32 (bf16/fp16 log-softmax loses the small probabilities); fp64 stays.
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)  # a view for contiguous model outputs
    flat_targets = targets.reshape(-1)
    valid = flat_targets != ignore_index
    num_tokens = valid.sum()

    if chunk_size is None:
        x = flat_logits.to(compute_dtype)
        # Sum over the supervised tokens; 0.0 (in the graph, zero gradient) when there are none.
        loss_sum = F.cross_entropy(x, flat_targets, ignore_index=ignore_index, reduction="sum")
        if z_loss:
            lse = torch.logsumexp(x, dim=-1)
            loss_sum = loss_sum + z_loss * torch.where(valid, lse.square(), 0.0).sum()
    else:
        safe_targets = torch.where(valid, flat_targets, 0)  # gather needs in-range indices
        loss_sum = ChunkedCrossEntropy.apply(
            flat_logits, safe_targets, valid, chunk_size, z_loss, compute_dtype
        )
    loss = loss_sum / _denominator(num_items_in_batch, num_tokens, loss_sum.device)
    return LossParts(loss=loss, loss_sum=loss_sum, num_tokens=num_tokens)


def causal_lm_loss(
    outputs: Any, labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | float | None = None, *, ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None, z_loss: float = 0.0, shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-weighted next-token cross-entropy that is 0.0, never NaN, when nothing is supervised.

    Usable unchanged as ``Trainer(compute_loss_func=causal_lm_loss)`` and from a plain loop.

    Args:
        outputs: logits ``(..., seq, vocab)``, or a model output / mapping carrying ``logits``.
        labels: token ids of the same ``(..., seq)`` shape, ``ignore_index`` where unsupervised.
            Shifted here as transformers does (position t predicts label t+1).
        num_items_in_batch: supervised (shifted) tokens of the whole accumulation window, summed
            over ranks (what the Trainer passes). Then every micro-batch's loss is its token-loss
            sum over this count, so accumulated gradients equal those of one big batch, and an
            empty micro-batch adds exactly 0. ``None``: divide by this batch's own count. An int,
            float or tensor (kept on device, never read on the host).
        ignore_index: label value that marks unsupervised positions.
        chunk_size: rows (tokens) per slice for the fp32 log-softmax; bounds peak memory at large
            vocabularies (forward and backward). ``None``: one fused cross-entropy call.
        z_loss: weight of the ``logsumexp(logits)**2`` penalty per supervised token (PaLM's
            z-loss keeps logits from drifting); 0 disables it.
        shift_labels: already-shifted targets (same shape as ``labels``, as padding-free
            collators provide); when given, ``labels`` is ignored and nothing is shifted.

    Returns:
        A 0-d fp32 (fp64 for fp64 logits) tensor in the graph. With zero supervised tokens it is
        exactly 0.0 and backward gives zero gradients. A NaN/inf in supervised logits still
        gives a NaN loss: that is a fault for the guard to see, not to hide.

    Raises:
        TypeError: integer logits, non-integer labels, an unusable ``outputs`` object.
        ValueError: labels/logits shape mismatch or different devices (message names both).

    Out-of-range label ids (other than ``ignore_index``) are not checked here, since that needs
    a host sync; ``finitetune.validate_labels`` reports them before training.
    """
    return causal_lm_loss_parts(
        outputs, labels, num_items_in_batch, ignore_index=ignore_index, chunk_size=chunk_size,
        z_loss=z_loss, shift_labels=shift_labels,
    ).loss


class LossWindow(NamedTuple):
    """Totals since the last reset, as device tensors (reading them does not sync)."""

    loss_sum: torch.Tensor
    """Summed token loss over the window's micro-batches (fp32; NaN if any micro-batch was)."""
    num_tokens: torch.Tensor
    """Local supervised tokens over the window (int64). 0 means: nothing to learn from."""
    empty_micro_batches: torch.Tensor
    """Micro-batches with zero supervised tokens (int64)."""
    micro_batches: int
    """Micro-batches recorded (a host count: known without looking at any tensor)."""
    num_items_in_batch: torch.Tensor | None
    """Last ``num_items_in_batch`` seen (window count over all ranks), or None if not given."""

    @property
    def mean_loss(self) -> torch.Tensor:
        """Token-mean loss of the window; 0.0 when it has no tokens (check ``num_tokens``)."""
        return self.loss_sum / self.num_tokens.clamp(min=1)


class SafeCausalLMLoss:
    """``causal_lm_loss`` as a ``compute_loss_func`` that records what it saw, without syncing.

    Use ``Trainer(compute_loss_func=SafeCausalLMLoss())`` or call it in a plain loop as
    ``tracker(outputs, labels, num_items_in_batch)``. Each call returns the loss and, when
    autograd is enabled (training; the Trainer's evaluation runs under ``no_grad`` and is not
    recorded), updates these detached device tensors:

    - ``last_loss_sum``: the last micro-batch's summed token loss;
    - ``last_num_tokens``: its local supervised-token count;
    - ``last_num_items_in_batch``: the window count passed with it (None when not given);
    - the window totals since the last reset: ``window()`` returns them as a ``LossWindow``
      (``loss_sum``, ``num_tokens``, ``empty_micro_batches``, ``micro_batches``,
      ``num_items_in_batch``, and ``mean_loss``).

    For the guard, once per optimizer step and before deciding::

        w = tracker.window()
        guard.observe_loss(w.mean_loss, w.num_tokens)  # tensors; num_tokens == 0 -> empty window

    (in distributed runs ``loss_sum`` and ``num_tokens`` are the local rank's; reduce both, not
    ``mean_loss``). Then ``read_and_reset()`` (one host sync) gives plain numbers for the log,
    with ``loss`` None for a window without tokens, so it is counted as empty, not logged as 0.0;
    or ``reset()`` to start the next window without reading.
    """

    def __init__(
        self, *, ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None, z_loss: float = 0.0
    ) -> None:
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.z_loss = z_loss
        self.last_loss_sum: torch.Tensor | None = None
        self.last_num_tokens: torch.Tensor | None = None
        self.last_num_items_in_batch: torch.Tensor | None = None
        self._loss_sum: torch.Tensor | None = None
        self._num_tokens: torch.Tensor | None = None
        self._empty: torch.Tensor | None = None
        self._micro_batches = 0

    def __call__(
        self,
        outputs: Any,
        labels: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | float | None = None,
        *,
        shift_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        parts = causal_lm_loss_parts(
            outputs, labels, num_items_in_batch, ignore_index=self.ignore_index,
            chunk_size=self.chunk_size, z_loss=self.z_loss, shift_labels=shift_labels,
        )
        if torch.is_grad_enabled():
            self._record(parts, num_items_in_batch)
        return parts.loss

    def _record(self, parts: LossParts, num_items_in_batch: Any) -> None:
        loss_sum = parts.loss_sum.detach().float()
        num_tokens = parts.num_tokens.detach()
        empty = (num_tokens == 0).long()
        self.last_loss_sum, self.last_num_tokens = loss_sum, num_tokens
        if num_items_in_batch is None:
            self.last_num_items_in_batch = None
        else:
            self.last_num_items_in_batch = torch.as_tensor(num_items_in_batch).detach()
        if self._loss_sum is None or self._num_tokens is None or self._empty is None:
            self._loss_sum, self._num_tokens, self._empty = loss_sum, num_tokens, empty
        else:  # device-side adds; a NaN loss_sum stays NaN in the window, as it should
            device = self._loss_sum.device
            self._loss_sum = self._loss_sum + loss_sum.to(device)
            self._num_tokens = self._num_tokens + num_tokens.to(device)
            self._empty = self._empty + empty.to(device)
        self._micro_batches += 1

    def window(self) -> LossWindow:
        """Window totals as device tensors (zeros on CPU if nothing was recorded). No sync."""
        if self._loss_sum is None or self._num_tokens is None or self._empty is None:
            zero_i = torch.zeros((), dtype=torch.long)
            return LossWindow(torch.zeros(()), zero_i, zero_i.clone(), 0, None)
        return LossWindow(self._loss_sum, self._num_tokens, self._empty, self._micro_batches,
                          self.last_num_items_in_batch)

    def reset(self) -> None:
        """Start a new window (call after each optimizer step, skipped or not)."""
        self._loss_sum = self._num_tokens = self._empty = None
        self._micro_batches = 0

    def read_and_reset(self) -> dict[str, Any]:
        """Window totals as host numbers, then reset. ONE host sync; call once per step / log.

        Returns ``loss`` (token-mean, or None when the window had no supervised tokens),
        ``loss_sum``, ``num_tokens``, ``empty_micro_batches``, ``micro_batches`` and
        ``num_items_in_batch`` (None when not given). A NaN loss is returned as NaN: JSON
        writers must map it to null plus a flag (strict JSON has no NaN).
        """
        w = self.window()
        packed = [w.loss_sum.double(), w.num_tokens.double(), w.empty_micro_batches.double()]
        if w.num_items_in_batch is not None:
            packed.append(w.num_items_in_batch.to(w.loss_sum.device).double().reshape(()))
        values = torch.stack(packed).tolist()  # host sync (the only one)
        self.reset()
        num_tokens = int(values[1])
        return {
            "loss": values[0] / num_tokens if num_tokens > 0 else None,
            "loss_sum": values[0],
            "num_tokens": num_tokens,
            "empty_micro_batches": int(values[2]),
            "micro_batches": w.micro_batches,
            "num_items_in_batch": values[3] if len(values) > 3 else None,
        }

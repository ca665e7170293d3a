"""The safe causal-LM loss: token-level cross-entropy in fp32, never NaN, never a fake 0.0.

``causal`` takes logits; ``hidden`` takes the final hidden states and applies the LM head only
at supervised positions; ``chunked_cross_entropy`` and ``chunked_head`` are the autograd
functions behind them. Nothing here imports transformers: a plain loop uses it as is.
"""

from __future__ import annotations

from finitetune._lazy import lazy_getattr

_EXPORTS = {
    "LossParts": "finitetune.loss.causal",
    "LossWindow": "finitetune.loss.causal",
    "SafeCausalLMLoss": "finitetune.loss.causal",
    "causal_lm_loss": "finitetune.loss.causal",
    "causal_lm_loss_parts": "finitetune.loss.causal",
    "LMHead": "finitetune.loss.hidden",
    "LowRank": "finitetune.loss.hidden",
    "causal_lm_loss_from_hidden": "finitetune.loss.hidden",
    "causal_lm_loss_from_hidden_parts": "finitetune.loss.hidden",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr("finitetune.loss", _EXPORTS, globals())

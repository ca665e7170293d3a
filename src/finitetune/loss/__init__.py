"""The safe causal-LM loss: token-level cross-entropy in fp32, never NaN, never a fake 0.0.

``causal`` takes logits; ``hidden`` takes the final hidden states and applies the LM head only
at supervised positions; ``chunked_cross_entropy`` and ``chunked_head`` are the autograd
functions behind them. Nothing here imports transformers: a plain loop uses it as is.
"""

from __future__ import annotations

from finitetune._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "finitetune.loss.causal":
        "LossParts LossWindow SafeCausalLMLoss causal_lm_loss causal_lm_loss_parts",
    "finitetune.loss.hidden":
        "LMHead LowRank causal_lm_loss_from_hidden causal_lm_loss_from_hidden_parts",
}, globals())

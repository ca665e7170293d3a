"""A tiny Llama built from a config, for tests and benchmarks: seeded, no download, ~20k to a
few million parameters depending on the sizes asked for.

One builder so that every test's model is made the same way (seed first, then the config); the
sizes are arguments because each test picks the smallest model that shows its behaviour.
"""

from __future__ import annotations

from typing import Any

__all__ = ["tiny_llama"]


def tiny_llama(*, vocab: int = 64, hidden: int = 32, intermediate: int | None = None,
               layers: int = 1, heads: int = 4, kv_heads: int | None = None,
               positions: int = 64, seed: int = 0, **config: Any) -> Any:
    """A randomly initialised ``LlamaForCausalLM``, the same for the same arguments.

    ``intermediate`` defaults to ``2 * hidden``, ``kv_heads`` to ``heads``; any other
    ``LlamaConfig`` field goes through ``config`` (e.g. ``tie_word_embeddings=False``).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, max_position_embeddings=positions, **config))

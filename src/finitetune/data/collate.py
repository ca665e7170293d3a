"""Batching: pad to the longest row, mask padding by position, count supervised tokens."""

from __future__ import annotations

from typing import Any

import torch

from finitetune.numerics.constants import IGNORE_INDEX


class CausalLMCollator:
    """Right-pads ``input_ids``/``labels`` for training.

    Padding is masked by *position* (the attention mask), never by comparing token ids with
    the pad id: with pad = eos (SmolLM2, Llama-3, ...) masking by id would also mask the EOS
    that ends every answer, and the model would never learn to stop.

    With ``sample_ids=True``, rows that carry ``index`` (finitetune's tokenised rows do) add
    ``sample_ids`` so attribution can name the samples of a faulty step. That key is not a
    model input: use it only with ``GuardCallback`` or pass the batch through
    ``guard.observe_batch`` before ``model(**batch)``; both remove it.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, *,
                 sample_ids: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.sample_ids = sample_ids

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        n = len(rows)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, longest), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            input_ids[i, :k] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(r["labels"], dtype=torch.long)
            attention[i, :k] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if self.sample_ids and all("index" in r for r in rows):
            batch["sample_ids"] = torch.tensor([int(r["index"]) for r in rows], dtype=torch.long)
        return batch


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask for batched greedy generation."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, longest - len(p):] = 1
    return ids, mask

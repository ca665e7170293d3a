"""Held-out evaluation: greedy exact match and token-mean eval loss.

Exact match is the number a person checks first ("did it learn the task?"), so it is measured
before training as the baseline and after training, on the same deterministic split.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import torch

from finitetune.data.collate import CausalLMCollator, left_pad
from finitetune.data.tokenize import tokenize_prompts
from finitetune.loss.causal import causal_lm_loss_parts


def normalise_answer(text: str) -> str:
    """First line, lower case, outer whitespace and trailing punctuation removed."""
    text = text.strip().splitlines()[0] if text.strip() else ""
    return re.sub(r"[\s.!?,;:\"']+$", "", text.strip().lower())


@torch.no_grad()
def exact_match(
    model: Any,
    tokenizer: Any,
    records: list[dict],
    *,
    max_length: int,
    max_new_tokens: int = 8,
    batch_size: int = 32,
    template: str = "auto",
    examples: int = 5,
) -> dict:
    """Greedy-generate an answer for each record and compare it with the expected response."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    prompts, expected = tokenize_prompts(records, tokenizer, max_length=max_length,
                                         template=template)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    correct = 0
    shown: list[dict[str, Any]] = []
    for lo in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[lo: lo + batch_size], pad)
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        for j, text in enumerate(texts):
            want = expected[lo + j]
            ok = normalise_answer(text) == normalise_answer(want)
            correct += ok
            if len(shown) < examples:
                shown.append({"expected": want.strip(), "generated": text.strip(), "correct": ok})
    model.train(was_training)
    n = len(prompts)
    return {"exact_match": correct / n if n else 0.0, "correct": correct, "total": n,
            "seconds": round(time.perf_counter() - start, 2), "examples": shown}


@torch.no_grad()
def eval_loss(model: Any, rows: list[dict], pad_token_id: int, batch_size: int = 32) -> float:
    """Token-mean cross-entropy over the supervised tokens of ``rows``: the safe loss of
    training, summed over every batch and divided once by the total token count."""
    was_training = model.training
    model.eval()
    collate = CausalLMCollator(pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for lo in range(0, len(rows), batch_size):
        batch = collate(rows[lo: lo + batch_size])
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        # the training loss itself (fp32, shifted, masked); only its sum and count are used
        parts = causal_lm_loss_parts(logits, batch["labels"].to(device))
        total += parts.loss_sum.item()  # host sync: evaluation only, once per batch
        count += int(parts.num_tokens)
    model.train(was_training)
    return total / count if count else math.nan

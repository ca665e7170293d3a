"""Tokenise records into ``input_ids`` / ``labels`` with the prompt masked to ``ignore_index``.

Truncation works from the *prompt* side: when prompt + response exceed ``max_length`` the
prompt loses its oldest tokens first, so the response (and its EOS) survives whenever it fits.
Each example keeps the lengths needed to explain a label problem later (``prompt_len``,
``response_len``, tokens cut from each side).
"""

from __future__ import annotations

from typing import Any

from finitetune.data.templates import prompt_adds_special_tokens, render

IGNORE_INDEX = -100


def tokenize_records(
    records: list[dict],
    tokenizer: Any,
    *,
    max_length: int,
    template: str = "auto",
    truncation: str = "prompt_left",
) -> list[dict]:
    """Tokenise every record (batched through the fast tokenizer).

    ``truncation="prompt_left"`` (default) keeps the response; ``"right"`` cuts the end like a
    plain ``tokenizer(..., truncation=True)`` does, which can cut the response away (label
    validation reports that as ``truncated_away``).
    """
    pairs = [render(r, tokenizer, template) for r in records]
    special = prompt_adds_special_tokens(tokenizer, template)
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=special)["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for idx, (rec, p, r) in enumerate(zip(records, prompts, responses)):
        r = list(r) + [eos] if r else []  # an empty response stays empty: nothing to learn
        p_len, r_len = len(p), len(r)
        if p_len + r_len > max_length:
            if truncation == "right":
                keep_r = max(0, max_length - p_len)
                p, r = p[:max_length], r[:keep_r]
            else:
                keep_p = max(min(1, p_len), max_length - r_len)
                p = p[p_len - keep_p:] if keep_p else []
                r = r[: max_length - len(p)]
        out.append({
            "input_ids": list(p) + r,
            "labels": [IGNORE_INDEX] * len(p) + r,
            "index": idx,
            "source": rec.get("source", str(idx)),
            "prompt_len": p_len,
            "response_len": r_len,
            "prompt_cut": p_len - len(p),
            "response_cut": r_len - len(r),
        })
    return out


def tokenize_prompts(records: list[dict], tokenizer: Any, *, max_length: int,
                     template: str = "auto") -> tuple[list[list[int]], list[str]]:
    """Prompt ids (left-truncated) and the expected responses, for generation-based eval."""
    pairs = [render(r, tokenizer, template) for r in records]
    special = prompt_adds_special_tokens(tokenizer, template)
    ids = tokenizer([p for p, _ in pairs], add_special_tokens=special)["input_ids"]
    return [list(x[-max_length:]) for x in ids], [r for _, r in pairs]

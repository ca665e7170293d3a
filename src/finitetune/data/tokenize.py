"""Tokenise records into ``input_ids`` / ``labels`` with the prompt masked to ``ignore_index``.

Two ways to say where the response starts:
- prompt/response (or chat ``messages``): the two parts are tokenised separately, so the
  boundary is exact by construction;
- pre-formatted ``text`` with a ``response_marker`` (e.g. ``"### Answer:"``): the marker is
  found by *character* position and mapped to tokens through the offset mapping. Searching for
  the marker's token ids instead fails whenever the marker tokenises differently in context
  than alone, silently masking the whole example.

Truncation works from the *prompt* side by default: when prompt + response exceed
``max_length`` the prompt loses its oldest tokens first, so the response (and its EOS) survives
whenever it fits. Every row keeps the lengths that explain a label problem later.
"""

from __future__ import annotations

from typing import Any

from finitetune.data.templates import prompt_adds_special_tokens, render
from finitetune.numerics.constants import IGNORE_INDEX


def _split_pairs(records: list[dict], tokenizer: Any, template: str,
                 marker: str | None) -> list[tuple[list[int], list[int], bool]]:
    """(prompt ids, response ids without EOS, marker found) for every record."""
    out: list[tuple[list[int], list[int], bool] | None] = [None] * len(records)
    text_idx = [i for i, r in enumerate(records) if "text" in r]
    pair_idx = [i for i, r in enumerate(records) if "text" not in r]
    if pair_idx:
        pairs = [render(records[i], tokenizer, template) for i in pair_idx]
        special = prompt_adds_special_tokens(tokenizer, template)
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=special)["input_ids"]
        responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
        for i, p, r in zip(pair_idx, prompts, responses):
            out[i] = (list(p), list(r), True)
    if text_idx:
        if not marker:
            raise ValueError("records with a 'text' field need a response_marker")
        texts = [records[i]["text"] for i in text_idx]
        enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
        for i, text, ids, offsets in zip(text_idx, texts, enc["input_ids"],
                                         enc["offset_mapping"]):
            pos = text.find(marker)
            if pos < 0:
                out[i] = (list(ids), [], False)
                continue
            boundary = pos + len(marker)
            # tokens that start at or after the end of the marker are the response
            cut = next((k for k, (start, _end) in enumerate(offsets)
                        if start >= boundary and _end > start), len(ids))
            out[i] = (list(ids[:cut]), list(ids[cut:]), True)
    return out  # type: ignore[return-value]


def truncate(p: list[int], r: list[int], max_length: int, mode: str,
             min_response_tokens: int = 1) -> tuple[list[int], list[int], bool]:
    """Fit prompt + response into ``max_length``; returns (prompt, response, fixed).

    ``prompt_left`` keeps the response whole when it fits. ``fix`` also keeps the response's
    head and its final token (EOS) when the response alone is too long.
    """
    if len(p) + len(r) <= max_length:
        return p, r, False
    if mode == "right":
        return p[:max_length], r[: max(0, max_length - len(p))], False
    keep_p = max(min(1, len(p)), max_length - len(r))
    p = p[len(p) - keep_p:] if keep_p else []
    room = max_length - len(p)
    if mode == "fix" and len(r) > room and room >= max(2, min_response_tokens):
        return p, r[: room - 1] + r[-1:], True
    return p, r[:room], mode == "fix"


def tokenize_records(
    records: list[dict],
    tokenizer: Any,
    *,
    max_length: int,
    template: str = "auto",
    truncation: str = "prompt_left",
    response_marker: str | None = None,
    min_response_tokens: int = 1,
) -> list[dict]:
    """Tokenise every record (batched through the fast tokenizer).

    ``truncation``: ``prompt_left`` (default, keeps the response), ``right`` (cuts the end,
    like ``tokenizer(..., truncation=True)``; can cut the response away, which label
    validation reports as ``truncated_away``), or ``fix`` (``prompt_left`` that also keeps the
    EOS of an over-long response).
    """
    eos = tokenizer.eos_token_id
    rows = []
    for idx, (rec, (p, r, found)) in enumerate(
            zip(records, _split_pairs(records, tokenizer, template, response_marker))):
        r = [*r, eos] if r else []  # an empty response stays empty: nothing to learn
        p_len, r_len = len(p), len(r)
        p, r, fixed = truncate(p, r, max_length, truncation, min_response_tokens)
        rows.append({
            "input_ids": p + r,
            "labels": [IGNORE_INDEX] * len(p) + r,
            "index": idx,
            "source": rec.get("source", str(idx)),
            "prompt_len": p_len,
            "response_len": r_len,
            "prompt_cut": p_len - len(p),
            "response_cut": r_len - len(r),
            "marker_found": found,
            "max_length": max_length,
            "fixed": fixed,
        })
    return rows


def tokenize_prompts(records: list[dict], tokenizer: Any, *, max_length: int,
                     template: str = "auto") -> tuple[list[list[int]], list[str]]:
    """Prompt ids (left-truncated) and the expected responses, for generation-based eval."""
    pairs = [render(r, tokenizer, template) for r in records]
    special = prompt_adds_special_tokens(tokenizer, template)
    ids = tokenizer([p for p, _ in pairs], add_special_tokens=special)["input_ids"]
    return [list(x[-max_length:]) for x in ids], [r for _, r in pairs]

"""Turn a record into (prompt text, response text): the only place that knows about templates.

The prompt and the response are rendered and tokenised *separately* and then concatenated, so
the boundary between "not learned" and "learned" is exact by construction: there is no response
marker to search for in the tokenised text (the classic "marker tokenizes differently in
context" trap), and padding is masked by position, never by token id (pad = eos is safe).
"""

from __future__ import annotations

from typing import Any


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(record: dict, tokenizer: Any, template: str = "auto") -> tuple[str, str]:
    """Return ``(prompt_text, response_text)``; EOS is added later as a token id, not as text."""
    use_chat = template == "chat" or (template == "auto" and has_chat_template(tokenizer))
    if "messages" in record:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        history, response = messages[:last], messages[last]["content"]
        if use_chat and has_chat_template(tokenizer):
            prompt = tokenizer.apply_chat_template(history, tokenize=False,
                                                   add_generation_prompt=True)
        else:
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant:"
            response = " " + response if response and not response.startswith(" ") else response
        return prompt, response
    prompt, response = record["prompt"], record["response"]
    if use_chat and has_chat_template(tokenizer):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                               tokenize=False, add_generation_prompt=True)
    return prompt, response


def prompt_adds_special_tokens(tokenizer: Any, template: str = "auto") -> bool:
    """A rendered chat template already contains its special tokens; plain text does not."""
    return not (template in ("auto", "chat") and has_chat_template(tokenizer))

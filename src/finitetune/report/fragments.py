"""Log entries salvaged from JSON that does not parse as a whole.

People paste ``trainer_state.json`` the way it fits in an issue: cut off mid-object, or only the
middle of ``log_history`` (``{ "loss": 0.0, "grad_norm": NaN, ... },`` blocks). The entries
inside are perfectly readable; only the document around them is broken. Each ``{`` is tried as
the start of a JSON object (Python's reader, which accepts the bare ``NaN`` the Trainer
writes); objects that are log entries are kept, the rest is skipped. The report says that it
salvaged, from how much, and where the readable part ended.
"""

from __future__ import annotations

import json
import re

from finitetune.parsing.nesting import check_json
from finitetune.report.records import Collector, ParsedLog

__all__ = ["looks_like_json_members", "salvage_json"]

_MEMBER = re.compile(r'^\s*"[^"\n]+"\s*:\s*\S', re.M)
_DECODER = json.JSONDecoder()


def looks_like_json_members(head: str) -> bool:
    """Text with ``"key": value`` lines: part of a pretty-printed JSON document."""
    return len(_MEMBER.findall(head, 0, 4096)) >= 2


def salvage_json(text: str, source: str, why: str) -> ParsedLog | None:
    """The log entries of a broken JSON document, or None if there is none.

    ``why`` is the parser's complaint about the whole document, quoted in the note.
    """
    check_json(text, source)  # each object is decoded recursively: bound the nesting first
    col = Collector()
    kept = 0
    last_end = 0
    i = text.find("{")
    while i != -1:
        try:
            obj, end = _DECODER.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict) and "log_history" not in obj and col.add(obj):
            kept += 1
            last_end = end
            i = text.find("{", end)
        else:
            i = text.find("{", i + 1)
    if not kept:
        return None
    kind = "trainer_state" if '"log_history"' in text else "json_fragments"
    log = col.finish(ParsedLog(source, kind, lines=text.count("\n") + 1))
    tail = text[last_end:].strip(" \t\r\n,]}")
    ends = (f"; the readable part ends at line {text.count(chr(10), 0, last_end) + 1}"
            if tail else "")
    log.notes.insert(0, f"salvaged {kept} log entries from JSON that does not parse as a whole "
                        f"({why}){ends}: the document is cut off or pasted in part")
    return log

"""Text for a terminal: escape sequences and control characters taken out.

A metric name, a file name, a data field or an event message can carry ``ESC [ ... m``
colours, cursor moves, an OSC title change or a carriage return that overwrites the line
before it; printed raw, they redraw the reader's terminal (or hide a finding). Every string
finitetune prints from its input goes through :func:`printable` first: the report's Markdown
and HTML, ``explain``, ``check``, ``watch``'s lines and panel, ``run``'s summaries and every
error message.
"""

from __future__ import annotations

import logging
import re

__all__ = ["PrintableLog", "printable"]

_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"          # CSI: colours, cursor moves, erase
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window title, hyperlinks
    r"|\x1b[@-Z\\-_]"                   # other two-character escapes
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"   # C0 and C1 controls, DEL (tab and newline stay)
    r"|[\u202a-\u202e\u2066-\u2069]"    # bidirectional overrides that reorder what is shown
)


def printable(text: str) -> str:
    """``text`` without terminal escape sequences and control characters (``\\n`` and ``\\t``
    kept). Cheap when there is nothing to remove (one regular-expression search)."""
    return _ESCAPES.sub("", text) if _ESCAPES.search(text) else text


class PrintableLog(logging.Filter):
    """A logging filter that passes every record's message through :func:`printable` (the
    command line installs it on the ``finitetune`` logger, whose warnings name files, lines
    and samples from the user's input)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = printable(message)
        if clean is not message:
            record.msg, record.args = clean, None
        return True

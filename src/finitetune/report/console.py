"""Console captures: the Trainer's printed log dicts, else ``key: value`` lines.

Pasted or tee'd console text carries progress bars, carriage returns, ANSI colours and markdown
fences around the Trainer's printed dicts. It is scanned streaming, with compiled regexes and no
``ast``/``eval``, as bytes where possible: a million-line capture parses in seconds. The entries
found go through the same :class:`~finitetune.report.parse.Collector` as every other format.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from finitetune.errors import ReportInputError
from finitetune.report.parse import EXPECTED, Collector, ParsedLog, norm_key, open_text

__all__ = ["BLOCK", "parse_console"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]")
# Console text is scanned as bytes: no decoding of megabytes of progress bars, and float()
# parses bytes itself. A dict never spans lines; its values may be quoted (Trainer's .4g).
_ANSI_B = re.compile(_ANSI.pattern.encode())
_DICT_B = re.compile(rb"\{[^{}\n]*\}")
_PAIR_B = re.compile(rb"""['"]([^'"]+)['"]\s*:\s*(?:'([^']*)'|"([^"]*)"|([^,}\s]+))""")
_NUM = r"[-+]?(?:nan|inf(?:inity)?|\d+\.?\d*(?:e[-+]?\d+)?|\.\d+(?:e[-+]?\d+)?)"
_KV = re.compile(
    r"(?<![\w'\"/.\-])([a-z][\w/.\-]*)(\s*[:=]\s*|\s+)(" + _NUM + r")(?![\w.])", re.IGNORECASE
)
_KNOWN = frozenset(("loss", "grad_norm", "learning_rate", "step", "epoch"))
_HINT = re.compile(r"loss|norm|acc|exact_match", re.IGNORECASE)

BLOCK = 1 << 22
"""Bytes read per block (4 MiB, extended to the end of its last line)."""


def parse_console(src: Path | str, source: str) -> ParsedLog:
    """Console captures: the Trainer's dict lines, else ``key: value`` lines.

    Dicts are found by regex over 4 MiB blocks (C speed; a dict never spans a line, and a
    progress bar's carriage returns do not matter to it). Only input without any dict is read
    again line by line for ``key: value`` pairs: where both appear, a progress bar's
    ``loss=2.51`` postfix is redrawn many times per step and would count one value many times.
    """
    dicts = Collector()
    lines = 0
    for block in _blocks(src):
        lines += block.count(b"\n")
        if b"\x1b" in block:
            block = _ANSI_B.sub(b"", block)
        for match in _DICT_B.finditer(block):
            pairs = _PAIR_B.findall(match.group())
            if pairs:
                dicts.add_pairs(pairs)
    if dicts.records or dicts.evals:
        return dicts.finish(ParsedLog(source, "console", lines=lines))
    kvs = Collector()
    first_text: tuple[int, str] | None = None
    lineno = 0
    for lineno, raw in enumerate(_lines(src), 1):
        line = _ANSI.sub("", raw) if "\x1b" in raw else raw
        if first_text is None and line.strip():
            first_text = (lineno, line.strip())
        if not _HINT.search(line):
            continue
        for seg in line.split("\r"):
            if "%|" in seg:  # a progress bar's postfix: redrawn, not a log line
                continue
            entry = {k: v for k, sep, v in _KV.findall(seg)
                     if sep.strip() or norm_key(k) in _KNOWN}  # "loss 2.5": known keys only
            if entry:
                kvs.add(entry)
    if not kvs.records and not kvs.evals:
        where = (f"first line (line {first_text[0]}): {first_text[1][:160]!r}"
                 if first_text else "the input holds only blank lines")
        raise ReportInputError(
            f"{source}: no training log entry found in {lineno} lines; {EXPECTED}. {where}"
        )
    return kvs.finish(ParsedLog(source, "key_value", lines=lineno))


def _blocks(src: Path | str) -> Iterator[bytes]:
    """Blocks of whole lines: streaming, so a huge log never sits in memory at once."""
    if isinstance(src, str):
        yield src.encode("utf-8", "replace")
        return
    with open(src, "rb") as fh:
        while block := fh.read(BLOCK):
            if not block.endswith(b"\n"):
                block += fh.readline()
            yield block


def _lines(src: Path | str) -> Iterator[str]:
    if isinstance(src, str):
        yield from src.split("\n")
        return
    with open_text(src) as fh:
        yield from fh

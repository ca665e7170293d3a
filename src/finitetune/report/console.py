"""Console text: the Trainer's printed dicts, ``key: value`` lines and their many dialects.

Pasted or tee'd console text carries progress bars, carriage returns, ANSI colours and markdown
fences around the Trainer's printed dicts. It is scanned streaming, with compiled regexes and no
``ast``/``eval``, as bytes where possible: a million-line capture parses in seconds. Besides the
Trainer's dicts it reads ``key: value`` / ``key=value`` / ``key value`` lines of other trainers:
Megatron (``lm loss: 2.3E+00 | grad norm: 1.2``), DeepSpeed (``lr=[1e-4]``), torchtitan
(``step: 1  loss: 7.6  grad_norm: 26.6``), nanoGPT (``iter 100: loss 2.35``), fairseq
(``loss=14.3, gnorm=3.9, num_updates=190``), mmengine, the Trainer's ``***** eval metrics *****``
blocks, and fp16 loss-scaler overflow messages (recorded as ``loss_scale_skip`` events).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from finitetune.errors import ReportInputError
from finitetune.report.names import norm_key, phrase_pattern
from finitetune.report.records import Collector, ParsedLog, to_number

__all__ = ["BLOCK", "EXPECTED", "KeyValueScanner", "parse_console"]

EXPECTED = (
    "expected a finitetune run directory (metrics.jsonl), a transformers trainer_state.json, "
    "JSON lines of log dicts, console text with the Trainer's printed dicts such as "
    "{'loss': 2.25, 'grad_norm': 1.57, 'learning_rate': 2e-05, 'epoch': 0.06}, "
    "'loss: 2.51  grad_norm: 1.2' lines, a TensorBoard event directory, an MLflow mlruns/ "
    "folder, a trackio .db store or a W&B CSV export"
)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]")
# Console text is scanned as bytes: no decoding of megabytes of progress bars, and float()
# parses bytes itself. A dict never spans lines; its values may be quoted (Trainer's .4g).
_ANSI_B = re.compile(_ANSI.pattern.encode())
_DICT_B = re.compile(rb"\{[^{}\n]*\}")
_PAIR_B = re.compile(rb"""['"]([^'"]+)['"]\s*:\s*(?:'([^']*)'|"([^"]*)"|([^,}\s]+))""")
_NUM = r"[-+]?(?:nan|inf(?:inity)?|\d+\.?\d*(?:e[-+]?\d+)?|\.\d+(?:e[-+]?\d+)?)"
_PHRASE = re.compile(r"(?<![\w/])(" + phrase_pattern() + r")\s*[:=]?\s*\[?(" + _NUM
                     + r")(?![\w.])", re.IGNORECASE)
_KV = re.compile(r"(?<![\w'\"/.\-])([a-z][\w/.\-]*)(\s*[:=]\s*\[?|\s+)(" + _NUM + r")(?![\w.])",
                 re.IGNORECASE)
_KNOWN = frozenset(("loss", "grad_norm", "learning_rate", "step", "epoch", "eval_loss"))
_HINT = re.compile(r"loss|norm|acc|exact_match", re.IGNORECASE)
_BLOCK_HEAD = re.compile(r"\*{3,}\s*(\w+) metrics\s*\*{3,}")
_BLOCK_LINE = re.compile(r"^\s+([\w/.\-]+)\s+=\s+(\S+)\s*$")
_OVERFLOW = re.compile(
    r"overflow[^\n]*?(?:loss[ _]scale|scale)[^\n]*?(?:to:?|reducing to)\s*(" + _NUM + ")"
    r"|Found NaN, decreased (?:lg_)?loss_scale to (" + _NUM + ")", re.IGNORECASE)

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
    lines = scan_dicts(_blocks(src), dicts)
    if dicts.records or dicts.evals:
        return dicts.finish(ParsedLog(source, "console", lines=lines))
    scanner = KeyValueScanner()
    lineno = 0
    for lineno, raw in enumerate(_lines(src), 1):
        scanner.feed(raw, lineno)
    kvs = scanner.finish()
    if not kvs.records and not kvs.evals:
        first = scanner.first_text
        where = (f"first line (line {first[0]}): {first[1][:160]!r}"
                 if first else "the input holds only blank lines")
        raise ReportInputError(
            f"{source}: no training log entry found in {lineno} lines; {EXPECTED}. {where}"
        )
    return kvs.finish(ParsedLog(source, "key_value", lines=lineno))


def scan_dicts(blocks: Iterator[bytes], col: Collector) -> int:
    """Feed every printed log dict in ``blocks`` to ``col``; returns the lines seen."""
    lines = 0
    for block in blocks:
        lines += block.count(b"\n")
        if b"\x1b" in block:
            block = _ANSI_B.sub(b"", block)
        for match in _DICT_B.finditer(block):
            pairs = _PAIR_B.findall(match.group())
            if pairs:
                col.add_pairs(pairs)
    return lines


class KeyValueScanner:
    """Line-by-line reader of ``key: value`` dialects (incremental: ``watch`` feeds it)."""

    def __init__(self, col: Collector | None = None) -> None:
        self.col = col or Collector()
        self.first_text: tuple[int, str] | None = None
        self._block: str | None = None
        self._block_entry: dict[str, str] = {}

    def feed(self, raw: str, lineno: int = 0) -> None:
        """One line of console text."""
        line = _ANSI.sub("", raw) if "\x1b" in raw else raw
        if self.first_text is None and line.strip():
            self.first_text = (lineno, line.strip())
        if self._metrics_block(line):
            return
        overflow = _OVERFLOW.search(line)
        if overflow:
            scale = to_number(overflow.group(1) or overflow.group(2))
            self.col.add_event({"kind": "loss_scale_skip", "reason": "fp16 overflow, loss "
                                f"scale lowered to {scale:g}" if scale is not None
                                else "fp16 overflow"})
            return
        if not _HINT.search(line):
            return
        for seg in line.split("\r"):
            if "%|" in seg:  # a progress bar's postfix: redrawn, not a log line
                continue
            entry = {k: v for k, v in _PHRASE.findall(seg)}
            rest = _PHRASE.sub(" ", seg) if entry else seg
            entry.update({k: v for k, sep, v in _KV.findall(rest)
                          if sep.strip() or norm_key(k) in _KNOWN})  # "loss 2.5": known keys
            if entry:
                self.col.add(entry)

    def _metrics_block(self, line: str) -> bool:
        """The Trainer's ``***** eval metrics *****`` blocks of ``key = value`` lines."""
        head = _BLOCK_HEAD.search(line)
        if head:
            self._close_block()
            self._block = head.group(1).lower()
            return True
        if self._block is not None:
            m = _BLOCK_LINE.match(line)
            if m:
                self._block_entry[m.group(1)] = m.group(2)
                return True
            self._close_block()
        return False

    def _close_block(self) -> None:
        entry, kind = self._block_entry, self._block
        self._block, self._block_entry = None, {}
        if not entry:
            return
        if kind == "train":  # the end-of-training summary, whatever its runtime format
            self.col.summary.update({k: x for k, v in entry.items()
                                     if (x := to_number(v)) is not None})
        else:
            self.col.add(entry)

    def finish(self) -> Collector:
        self._close_block()
        return self.col


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
    with open(src, encoding="utf-8", errors="replace", newline="\n") as fh:
        yield from fh

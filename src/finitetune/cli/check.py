"""``finitetune check``: validate the labels of a data file before any training.

Runs the same loading, tokenisation and label validation as ``finitetune train`` and prints
counts by reason (with percentages) and a few offending examples with their line numbers.
Exit 0 when clean, 1 when unusable examples exceed ``--max-bad`` percent, 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from finitetune.errors import ConfigError


def add_parser(subparsers: Any, help_text: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check", help=help_text, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="JSONL, CSV, Parquet or save_to_disk folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory (its tokenizer is used), demo or tiny")
    src.add_argument("--tokenizer", help="tokenizer directory")
    p.add_argument("--max-length", type=int, default=256, help="tokens per example")
    p.add_argument("--template", default="auto", help="auto, chat or plain")
    p.add_argument("--truncation", default="prompt_left", help="prompt_left or right")
    p.add_argument("--response-marker", help="for pre-formatted 'text' rows")
    p.add_argument("--min-supervised", type=int, default=1,
                   help="warn for examples with fewer supervised tokens")
    p.add_argument("--max-bad", type=float, default=0.0,
                   help="percent of unusable examples tolerated before exit 1 (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the tokenizer's own Python code (as train --trust-remote-code)")
    for field in ("prompt", "response", "messages", "text"):
        p.add_argument(f"--{field}-field", default=field, help=f"{field} column")
    return p


# DataConfig setting -> (flag, argparse dest): errors name the flag the user typed
_FLAGS = {"path": ("--data", "data"), "prompt_field": ("--prompt-field", "prompt_field"),
          "response_field": ("--response-field", "response_field"),
          "messages_field": ("--messages-field", "messages_field"),
          "text_field": ("--text-field", "text_field"),
          "response_marker": ("--response-marker", "response_marker"),
          "max_length": ("--max-length", "max_length"), "template": ("--template", "template"),
          "truncation": ("--truncation", "truncation"),
          "min_response_tokens": ("--min-supervised", "min_supervised")}


def data_config(args: argparse.Namespace) -> Any:
    """The :class:`DataConfig` of the flags, checked by the same rules as ``train``'s."""
    from finitetune.errors import SettingError
    from finitetune.settings.config import DataConfig

    try:
        return DataConfig(**{name: getattr(args, dest) for name, (_f, dest) in _FLAGS.items()})
    except SettingError as exc:
        raise exc.located(f"flag {_FLAGS[exc.setting][0]}") from None


def run(args: argparse.Namespace) -> int:
    from finitetune.cli.main import set_offline_if_local

    set_offline_if_local(args.model or args.tokenizer, args.data)
    if not 0 <= args.max_bad <= 100:  # NaN fails this too
        raise ConfigError(f"--max-bad {args.max_bad}: expected a percentage in [0, 100]")
    data = data_config(args)
    from finitetune.data.pipeline import load_data_records, tokenize_with, validate_rows
    from finitetune.models import load_tokenizer, resolve_model, resolve_tokenizer

    records = load_data_records(data)
    source = (resolve_model(args.model, tokenizer_flag="--tokenizer") if args.model
              else resolve_tokenizer(args.tokenizer))
    tokenizer = load_tokenizer(source, trust_remote_code=args.trust_remote_code,
                               remote_code_flag="--trust-remote-code")
    report = validate_rows(tokenize_with(records, tokenizer, data), tokenizer, data)
    bad_pct = 100.0 * (report.total - report.usable) / report.total
    if args.json:
        print(json.dumps({**report.to_dict(), "bad_percent": bad_pct}, indent=2))
    else:
        from finitetune.parsing.terminal import printable

        print(printable(format_report(report, data.path)))
    return 1 if bad_pct > args.max_bad else 0


def format_report(report, path: str | None) -> str:
    from finitetune.data.labels import CAUSES, ERRORS, FIXES, REASONS

    lines = [f"{path}: {report.total} examples, {report.usable} usable, "
             f"{report.supervised_tokens} supervised tokens", ""]
    rows = [(r, report.counts[r]) for r in REASONS if report.counts.get(r)]
    if not rows:
        lines.append("no label problems found")
        return "\n".join(lines)
    lines.append(f"{'reason':<28}{'examples':>9}{'share':>9}  kind")
    for reason, n in rows:
        kind = "error" if reason in ERRORS else "cause" if reason in CAUSES else "warning"
        lines.append(f"{reason:<28}{n:>9}{100 * n / report.total:>8.1f}%  {kind}")
    lines += ["", report.explain(), ""]
    for reason, _ in rows:
        where = report.sources.get(reason) or [f"#{i}" for i in report.indices[reason]]
        more = f" (+{len(report.indices[reason]) - 5} more)" if len(where) > 5 else ""
        lines.append(f"{reason}: {', '.join(where[:5])}{more}")
        if reason not in CAUSES:
            lines.append(f"  fix: {FIXES[reason]}")
        for pv in [p for p in report.previews if p["reason"] == reason][:2]:
            lines.append(f"  e.g. {pv['source'] or '#' + str(pv['index'])}: {pv['text']!r}")
    return "\n".join(lines)


if __name__ == "__main__":
    from finitetune.cli.main import main

    sys.exit(main(["check", *sys.argv[1:]]))

"""``finitetune report``: health report of a run directory, trainer_state.json or pasted logs.

Exit code 0 healthy, and also for a warning or an inconclusive log (nothing wrong, nothing
showing that the model learns) unless ``--strict``; 1 unhealthy; 2 unreadable input. So a CI
job can gate a fine-tune on its own logs, and with ``--strict`` demand evidence that it learns.
"""

from __future__ import annotations

import argparse
import math
import sys

from finitetune.errors import ReportInputError


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    """Register the ``report`` verb and its options."""
    p = subparsers.add_parser(
        "report", help=help_text, description=help_text + ". " + _FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="PATH",
                   help="run directory, log file, tracker store or TensorBoard folder; - for stdin")
    p.add_argument("--compare", metavar="BEFORE",
                   help="a second log (e.g. the broken run) for a before/after table")
    p.add_argument("--format", choices=("md", "json", "html"), default="md",
                   help="output format (default md)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write to FILE (a regular file; - for stdout) instead of stdout")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 unless healthy (a warning or an inconclusive log fails too)")
    p.add_argument("--vocab-size", type=int, metavar="N",
                   help="vocabulary size for the first-loss bound (default: from the run, "
                        "else 262144)")
    p.add_argument("--max-grad-norm", type=float, metavar="X",
                   help="clip value, to detect a grad norm pinned at it")
    return p


_FORMATS = ("Reads a finitetune run directory, a transformers trainer_state.json (whole or a "
            "cut-off fragment), JSON lines of log dicts (LLaMA-Factory's trainer_log.jsonl), "
            "console text (the Trainer's printed dicts; DeepSpeed, Megatron, torchtitan, "
            "nanoGPT 'loss: x' lines), a TensorBoard event folder (pip install "
            "'finitetune[logs]'), an MLflow mlruns/ folder, a trackio .db store or W&B CSV "
            "exports. Verdicts: healthy (evidence that the model learns, nothing wrong), "
            "inconclusive (nothing wrong, nothing showing it learns), warning, unhealthy. Exit "
            "codes: 0 healthy, inconclusive or warning; 1 unhealthy (or anything but healthy "
            "with --strict); 2 unreadable input.")


def run(args: argparse.Namespace) -> int:
    """Build the report, print or write it, and return the verdict's exit code."""
    from finitetune.report import health_report, to_html, to_json, to_markdown

    if args.vocab_size is not None and args.vocab_size < 2:
        raise ReportInputError(f"--vocab-size {args.vocab_size}: expected an integer >= 2")
    if args.max_grad_norm is not None and not 0 < args.max_grad_norm < math.inf:  # and NaN
        raise ReportInputError(f"--max-grad-norm {args.max_grad_norm}: expected a finite "
                               "number > 0")
    from finitetune.rundir.paths import check_output_file

    # before the report is built: a path that may not be written stops here, untouched
    target = check_output_file(args.output, "-o") if args.output else None
    report = health_report(args.path, compare=args.compare, vocab_size=args.vocab_size,
                           max_grad_norm=args.max_grad_norm)
    text = {"md": to_markdown, "json": to_json, "html": to_html}[args.format](report)
    if target is not None:
        from finitetune.rundir.jsonio import write_text_atomic

        write_text_atomic(target, text)
        print(f"finitetune report: {report.verdict} -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return report.exit_code(strict=args.strict)

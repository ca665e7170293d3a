"""``finitetune verify``: prove the fixes on this machine.

Runs a minimal guarded training and prints the seed-style report (entries, valid, NaN, zero,
range, mean, trend), then five failure scenarios, each twice on a real transformers Trainer:
unguarded (plain transformers defaults) and guarded (finitetune), with a before/after table:

  all_masked     all labels masked in some batches
  hidden_nan     a NaN loss hidden by the Trainer's logging filter
  inf_grad       inf injected into a gradient at step 7 (checked against a control run)
  fp16_overflow  an activation overflow in reduced precision (fp16 rounding simulated on CPU)
  lr_divergence  a learning rate that diverges

Exit 0 only when every guarded run is healthy AND every unguarded run reproduces its failure
(so each scenario is proven real here); 1 otherwise; 2 for unusable input.

The default model is the embedded tiny Llama (2 layers, <1M parameters, built locally, no
download) with its generated task: eleven short trainings finish in seconds on two CPU cores,
where the demo's SmolLM2-135M would take many minutes. The failures are numerical, not a
matter of model size. --model PATH runs the same scenarios on your own local model (full fine-tune on CPU:
slow for large models).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any, help_text: str) -> argparse.ArgumentParser:
    """Register the ``verify`` verb and its options."""
    p = subparsers.add_parser("verify", help=help_text, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5,
                   help="steps of the minimal guarded run (default 5; the scenarios use their "
                        "own fixed lengths, 20-30 steps)")
    p.add_argument("--output-dir", metavar="DIR",
                   help="keep each arm's files in DIR/<scenario>/<arm>/ and DIR/verify.json "
                        "(default: a temporary directory, removed)")
    p.add_argument("--model", default="tiny", metavar="PATH",
                   help="tiny (default: the embedded <1M-param Llama, fast) or a local model "
                        "directory")
    p.add_argument("--data", metavar="FILE",
                   help="training data (JSONL/CSV/Parquet, prompt/response or messages); "
                        "default: the tiny task, tokenised with the model's tokenizer")
    p.add_argument("--scenario", action="append", metavar="NAME",
                   help="run only this scenario (repeatable): all_masked, hidden_nan, "
                        "inf_grad, fp16_overflow, lr_divergence")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON instead of tables")
    return p


def run(args: argparse.Namespace) -> int:
    from finitetune.cli.main import set_offline_if_local

    set_offline_if_local(args.model, args.data)
    from finitetune.verify import run_verify

    result = run_verify(model=args.model, steps=args.steps, output_dir=args.output_dir,
                        data=args.data, scenarios=args.scenario, as_json=args.json)
    return result.exit_code


if __name__ == "__main__":
    from finitetune.cli.main import main

    sys.exit(main(["verify", *sys.argv[1:]]))

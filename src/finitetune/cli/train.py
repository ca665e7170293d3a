"""``finitetune train``: fine-tune with every safety on. No options = the embedded demo.

Settings resolve as: built-in defaults < the model's preset (``demo``/``tiny``) < ``--config
FILE.yaml`` < command-line flags. The resolved config is written to ``config.yaml`` in the run
directory, so ``--config RUN/config.yaml`` reproduces a run.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

# flag -> (dotted TrainConfig path, type, help)
FLAGS: dict[str, tuple[str, Any, str]] = {
    "--model": ("model", str, "demo (default), tiny, a local model directory or a hub id"),
    "--data": ("data.path", str, "JSONL, CSV, Parquet or save_to_disk folder "
                                 "(prompt/response or messages)"),
    "--output-dir": ("output_dir", str, "run directory (default runs/<model>-<time>)"),
    "--lora-r": ("lora_r", int, "LoRA rank; 0 = full fine-tune"),
    "--lora-alpha": ("lora_alpha", int, "LoRA alpha (default 2*r)"),
    "--lora-dropout": ("lora_dropout", float, "LoRA dropout"),
    "--lora-targets": ("lora_targets", str, "all-linear or comma list, e.g. q_proj,v_proj"),
    "--learning-rate": ("learning_rate", float, "peak learning rate"),
    "--warmup-ratio": ("warmup_ratio", float, "fraction of steps for warm-up"),
    "--lr-scheduler-type": ("lr_scheduler_type", str, "linear, cosine, constant, ..."),
    "--num-train-epochs": ("num_train_epochs", float, "epochs (when --max-steps is not set)"),
    "--max-steps": ("max_steps", int, "optimizer steps"),
    "--batch-size": ("per_device_train_batch_size", int, "micro-batch size per device"),
    "--gradient-accumulation-steps": ("gradient_accumulation_steps", int,
                                      "micro-batches per optimizer step"),
    "--max-grad-norm": ("max_grad_norm", float, "clip total grad norm (0 = off)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay"),
    "--logging-steps": ("logging_steps", int, "log every N steps"),
    "--save-steps": ("save_steps", int, "checkpoint every N steps (0 = at the end)"),
    "--seed": ("seed", int, "seed for split, shuffle, init"),
    "--max-length": ("data.max_length", int, "tokens per example"),
    "--eval-size": ("data.eval_size", int, "held-out examples"),
    "--template": ("data.template", str, "auto, chat or plain"),
    "--truncation": ("data.truncation", str, "prompt_left (keeps the response) or right"),
    "--prompt-field": ("data.prompt_field", str, "prompt column"),
    "--response-field": ("data.response_field", str, "response column"),
    "--messages-field": ("data.messages_field", str, "chat messages column"),
    "--on-label-problem": ("data.on_label_problem", str, "drop, error or fix"),
    "--precision": ("precision", str, "auto, bf16, fp16 or fp32"),
    "--guard-policy": ("guard.policy", str, "skip, rollback or halt"),
    "--clip": ("guard.clip", str, "fixed (clip to --max-grad-norm, as the Trainer does) or "
                                  "adaptive (ZClip: a threshold that follows the recent grad "
                                  "norms, never above --max-grad-norm)"),
    "--deepspeed": ("deepspeed", str, "DeepSpeed JSON config (ZeRO stage 1-3); launch with "
                                      "torchrun, deepspeed or accelerate launch"),
    "--guard-rollback-to": ("guard.rollback_to", str,
                            "memory (a copy of the trainable state) or disk (the newest healthy "
                            "checkpoint; needs --save-steps)"),
    "--skip-bad-samples": ("guard.skip_bad_samples", str,
                           "samples of faulty steps left out on resume: off, culprits, step, "
                           "window"),
    "--save-total-limit": ("save_total_limit", int, "checkpoints kept (the newest healthy one "
                                                    "always survives)"),
    "--loss": ("loss", str, "auto (LM head only at supervised positions), supervised or full"),
}
SWITCHES: dict[str, tuple[str, bool, str]] = {
    "--resume": ("resume", True, "continue from the newest healthy checkpoint in --output-dir "
                                 "(a run directory finitetune train created)"),
    "--overwrite": ("overwrite", True, "replace --output-dir if finitetune train created it "
                                       "(never a folder of yours)"),
    "--trust-remote-code": ("trust_remote_code", True, "allow the model's own Python code"),
    "--no-eval-before": ("eval_before", False, "skip the baseline evaluation"),
    "--no-attribution": ("attribution", False, "no fault attribution (replay) after a bad step"),
}

def add_parser(subparsers: Any, help_text: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help=help_text, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml", help="settings file; flags override it")
    for flag, (dest, typ, help_) in FLAGS.items():
        p.add_argument(flag, dest=dest, type=typ, default=argparse.SUPPRESS, help=help_)
    for flag, (dest, value, help_) in SWITCHES.items():
        p.add_argument(flag, dest=dest, action="store_const", const=value,
                       default=argparse.SUPPRESS, help=help_)
    return p


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k not in ("verb", "config")}
    flags = {dest: f"flag {flag}" for flag, (dest, *_rest) in {**FLAGS, **SWITCHES}.items()}
    from finitetune.settings.resolve import resolve_run_config

    cfg = resolve_run_config(args.config, overrides, {k: flags.get(k, k) for k in overrides})
    from finitetune.cli.main import set_offline_if_local

    set_offline_if_local(cfg.model, cfg.data.path)
    from finitetune.train.recipe import configure_runtime, quiet_third_party_warnings, run_training

    configure_runtime()
    with quiet_third_party_warnings():
        result = run_training(cfg)
    before, after = result.eval_before, result.eval_after
    if after is not None:
        line = f"exact match: {after['exact_match']:.1%}"
        if before is not None:
            line = f"exact match: {before['exact_match']:.1%} -> {after['exact_match']:.1%}"
        print(f"finitetune: {line}; run directory: {result.output_dir}", flush=True)
    return 0


def __getattr__(name: str) -> Any:
    """``finitetune.cli.train.train``, the previous home of the library entry point, kept for
    one release (imported on first use: the CLI must start without torch)."""
    if name == "train":
        from finitetune.train.api import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    from finitetune.cli.main import main

    sys.exit(main(["train", *sys.argv[1:]]))

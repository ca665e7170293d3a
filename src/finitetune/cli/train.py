"""``finitetune train``: fine-tune with every safety on. No options = the embedded demo.

Settings resolve as: built-in defaults < the model's preset (``demo``/``tiny``) < ``--config
FILE.yaml`` < command-line flags. The resolved config is written to ``config.yaml`` in the run
directory, so ``--config RUN/config.yaml`` reproduces a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from finitetune.errors import ConfigError

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
    "--guard-rollback-to": ("guard.rollback_to", str,
                            "memory (a copy of the trainable state) or disk (the newest healthy "
                            "checkpoint; needs --save-steps)"),
    "--skip-bad-samples": ("guard.skip_bad_samples", str,
                           "samples of faulty steps left out on resume: off, culprits, step, "
                           "window"),
    "--save-total-limit": ("save_total_limit", int, "checkpoints kept (the newest healthy one "
                                                    "always survives)"),
}
SWITCHES: dict[str, tuple[str, bool, str]] = {
    "--resume": ("resume", True, "continue from the newest healthy checkpoint in --output-dir"),
    "--overwrite": ("overwrite", True, "replace an existing run directory"),
    "--trust-remote-code": ("trust_remote_code", True, "allow the model's own Python code"),
    "--no-eval-before": ("eval_before", False, "skip the baseline evaluation"),
    "--no-attribution": ("attribution", False, "no fault attribution (replay) after a bad step"),
}

# Settings that make each built-in model do its job in its time budget.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"lora_r": 0, "learning_rate": 3e-3, "max_steps": 60, "warmup_ratio": 0.1,
             "per_device_train_batch_size": 16, "logging_steps": 10, "eval_max_new_tokens": 3,
             "data": {"max_length": 32, "eval_size": 200}},
    "demo": {"lora_r": 16, "learning_rate": 1e-3, "max_steps": 80, "warmup_ratio": 0.05,
             "per_device_train_batch_size": 8, "logging_steps": 5, "eval_max_new_tokens": 4,
             "data": {"max_length": 96, "eval_size": 200}},
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


def resolve_config(config_file: str | None, overrides: dict[str, Any]):
    """Merge defaults < preset < YAML < flags into a validated :class:`TrainConfig`."""
    import yaml

    from finitetune.config import TrainConfig

    from_file: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            from_file = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(from_file, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    nested_flags: dict[str, Any] = {}
    for dotted, value in overrides.items():
        _set(nested_flags, dotted.split("."), value)
    model = nested_flags.get("model") or from_file.get("model") or "demo"
    merged = _merge(_merge(PRESETS.get(model, {}), from_file), nested_flags)
    return _build(TrainConfig, merged, where=str(config_file or "settings"))


def _set(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls: Any, values: dict, where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r} for {cls.__name__}; "
                          f"known: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        sub = fields[name].default_factory  # nested dataclass sections (data, guard)
        if isinstance(value, dict) and dataclasses.is_dataclass(sub):
            value = _build(sub, value, f"{where}: {name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k not in ("verb", "config")}
    cfg = resolve_config(args.config, overrides)
    from finitetune.cli.main import set_offline_if_local

    set_offline_if_local(cfg.model, cfg.data.path)
    from finitetune.recipe import configure_runtime, quiet_third_party_warnings, run_training

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


def train(**settings: Any):
    """Python entry point: ``finitetune.cli.train.train(model="tiny", max_steps=20)``.

    Takes the same settings as the YAML file (nested ``data={...}``/``guard={...}`` or dotted
    keys such as ``**{"data.max_length": 64}``) and returns the :class:`RunResult`.
    """
    from finitetune.recipe import run_training

    config_file = settings.pop("config", None)
    return run_training(resolve_config(config_file, _flatten(settings)))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


if __name__ == "__main__":
    from finitetune.cli.main import main

    sys.exit(main(["train", *sys.argv[1:]]))

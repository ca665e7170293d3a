"""``finitetune train``: fine-tune with every safety on. No options = the embedded demo.

Settings resolve as: built-in defaults < the model's preset (``demo``/``tiny``) < ``--config
FILE.yaml`` < command-line flags. The resolved config is written to ``config.yaml`` in the run
directory, so ``--config RUN/config.yaml`` reproduces a run.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

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


def resolve_config(config_file: str | None, overrides: dict[str, Any],
                   sources: dict[str, str] | None = None):
    """Merge defaults < preset < YAML < ``overrides`` into a validated :class:`TrainConfig`.

    ``overrides`` has dotted keys (``data.max_length``); ``sources`` says where each came from
    (``flag --max-length``), for the error message. Each layer is checked on its own first,
    so an error names the file and line, or the flag, that holds the bad value.

    Raises:
        SettingError: a value of the wrong type or out of range, or an unknown setting.
        ConfigError: the config file cannot be read.
    """
    from finitetune.errors import SettingError
    from finitetune.settings.config import TrainConfig
    from finitetune.settings.validation import build, check_values

    from_file, file_lines = _read_yaml(Path(config_file)) if config_file else ({}, {})
    nested_flags: dict[str, Any] = {}
    for dotted, value in overrides.items():
        _set(nested_flags, dotted.split("."), value)
    model = nested_flags.get("model") or from_file.get("model") or "demo"
    preset = PRESETS.get(model, {}) if isinstance(model, str) else {}
    layers = [(preset, {}, f"the {model!r} preset"),
              (from_file, file_lines, str(config_file)),
              (nested_flags, sources or {}, "setting")]
    where: dict[str, str] = {}
    for values, lines, default in layers:
        try:
            check_values(TrainConfig, values)
        except SettingError as exc:
            raise exc.located(lines.get(exc.setting, default)) from None
        where.update({k: lines.get(k, default) for k in _flatten(values)})
    merged = _merge(_merge(preset, from_file), nested_flags)
    try:
        return build(TrainConfig, merged)
    except SettingError as exc:  # a rule between two settings: name where the first came from
        raise exc.located(where.get(exc.setting, "default")) from None


def _set(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a number as YAML 1.2 does (PyYAML follows
    YAML 1.1, where a float needs a dot, and would hand the string "1e-3" to the config)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings of a YAML file and, for each dotted key, ``file:line`` (for errors)."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file (a directory or a "
                          "special file); give a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=_YamlLoader)
        values = yaml.load(text, Loader=_YamlLoader) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got "
                          f"{type(values).__name__}")
    lines: dict[str, str] = {}
    _key_lines(node, path, "", lines)
    return values, lines


def _key_lines(node: Any, path: Path, prefix: str, out: dict[str, str]) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        dotted = f"{prefix}{key.value}"
        here = f"{path}:{key.start_mark.line + 1}"
        if dotted in out:  # PyYAML keeps the last silently; a repeated key is a mistake
            raise ConfigError(f"{here}: {dotted} is set twice (first at {out[dotted]}); "
                              "keep one")
        out[dotted] = here
        _key_lines(value, path, f"{dotted}.", out)


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k not in ("verb", "config")}
    flags = {dest: f"flag {flag}" for flag, (dest, *_rest) in {**FLAGS, **SWITCHES}.items()}
    cfg = resolve_config(args.config, overrides, {k: flags.get(k, k) for k in overrides})
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


def train(**settings: Any):
    """Python entry point: ``finitetune.cli.train.train(model="tiny", max_steps=20)``.

    Takes the same settings as the YAML file (nested ``data={...}``/``guard={...}`` or dotted
    keys such as ``**{"data.max_length": 64}``) and returns the :class:`RunResult`.
    """
    from finitetune.train.recipe import run_training

    config_file = settings.pop("config", None)
    flat = _flatten(settings)
    return run_training(resolve_config(config_file, flat,
                                       {k: f"train({k}=...)" for k in flat}))


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

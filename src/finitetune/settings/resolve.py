"""Resolving a run's settings: defaults < the built-in model's preset < the YAML file < flags.

Each layer is checked on its own before they are merged, so an error names the file and line,
or the flag, that holds the bad value (``max_steps = -5 (flag --max-steps): ...``).
"""

from __future__ import annotations

from typing import Any

from finitetune.errors import SettingError
from finitetune.settings.config import TrainConfig
from finitetune.settings.files import read_settings
from finitetune.settings.validation import build, check_layers, flatten, merge, set_dotted

__all__ = ["PRESETS", "flatten", "resolve_config", "resolve_run_config"]

# Settings that make each built-in model do its job in its time budget.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"lora_r": 0, "learning_rate": 3e-3, "max_steps": 60, "warmup_ratio": 0.1,
             "per_device_train_batch_size": 16, "logging_steps": 10, "eval_max_new_tokens": 3,
             "data": {"max_length": 32, "eval_size": 200}},
    "demo": {"lora_r": 16, "learning_rate": 1e-3, "max_steps": 80, "warmup_ratio": 0.05,
             "per_device_train_batch_size": 8, "logging_steps": 5, "eval_max_new_tokens": 4,
             "data": {"max_length": 96, "eval_size": 200}},
}


def resolve_config(config_file: str | None, overrides: dict[str, Any],
                   sources: dict[str, str] | None = None) -> TrainConfig:
    """Merge defaults < preset < YAML < ``overrides`` into a validated :class:`TrainConfig`.

    ``overrides`` has dotted keys (``data.max_length``); ``sources`` says where each came from
    (``flag --max-length``), for the error message. Each layer is checked on its own first,
    so an error names the file and line, or the flag, that holds the bad value.

    Raises:
        SettingError: a value of the wrong type or out of range, or an unknown setting.
        ConfigError: the config file cannot be read.
    """
    return _resolve(config_file, overrides, sources)[0]


def resolve_run_config(config_file: str | None, overrides: dict[str, Any],
                       sources: dict[str, str] | None = None) -> TrainConfig:
    """:func:`resolve_config`, and with ``resume``, the run's recorded settings beneath the
    file and the flags (defaults < preset < the run's settings < YAML < flags): a resume
    continues with what the run was trained with, changed only where asked. A change a resume
    cannot honour is refused here, naming the setting (:mod:`finitetune.settings.recorded`),
    before anything is written. ``finitetune train`` and ``train()`` resolve through this."""
    from finitetune.rundir.files import checkpoints
    from finitetune.rundir.paths import is_owned
    from finitetune.settings.recorded import (
        NOT_SETTINGS,
        changed_settings,
        check_resume_changes,
        read_recorded,
    )

    cfg, where = _resolve(config_file, overrides, sources)
    if not cfg.resume or not cfg.output_dir or not is_owned(cfg.output_dir):
        return cfg  # nothing recorded to continue: the main job says why, if it is an error
    recorded = read_recorded(cfg.output_dir)
    if recorded is None:
        return cfg
    base = {k: v for k, v in recorded.values.items() if k not in NOT_SETTINGS}
    cfg, where = _resolve(config_file, overrides, sources,
                          recorded=(base, str(recorded.files[-1])))
    if checkpoints(str(cfg.output_dir)):  # else a restart from step 0 (or refused for that reason)
        check_resume_changes(changed_settings(recorded, cfg),
                             " + ".join(str(f) for f in recorded.files), where)
    return cfg


def _resolve(config_file: str | None, overrides: dict[str, Any],
             sources: dict[str, str] | None = None,
             recorded: tuple[dict[str, Any], str] | None = None,
             ) -> tuple[TrainConfig, dict[str, str]]:
    """The config, and where each setting's value came from (dotted key -> source)."""
    from_file, file_lines = read_settings(config_file) if config_file else ({}, {})
    nested_flags: dict[str, Any] = {}
    for dotted, value in overrides.items():
        set_dotted(nested_flags, dotted, value)
    base, base_source = recorded or ({}, "")
    model = (nested_flags.get("model") or from_file.get("model") or base.get("model")
             or "demo")
    preset = PRESETS.get(model, {}) if isinstance(model, str) else {}
    layers = [(preset, {}, f"the {model!r} preset"), (base, {}, base_source),
              (from_file, file_lines, str(config_file)),
              (nested_flags, sources or {}, "setting")]
    where = check_layers(TrainConfig, layers)
    merged = merge(merge(merge(preset, base), from_file), nested_flags)
    try:
        return build(TrainConfig, merged), where
    except SettingError as exc:  # a rule between two settings: name where the first came from
        raise exc.located(where.get(exc.setting, "default")) from None



"""The settings table (``finitetune.settings.validation``): every field has a rule; the rules and the
YAML reader do what the error messages promise."""

from __future__ import annotations

import math

import pytest
import yaml

from finitetune.errors import ConfigError, SettingError, UnknownSettingError
from finitetune.settings.config import (
    DataConfig,
    GuardConfig,
    Precision,
    Template,
    TrainConfig,
    Truncation,
)
from finitetune.settings.validation import build, rules_of


@pytest.mark.parametrize("cls", [TrainConfig, DataConfig, GuardConfig])
def test_every_setting_declares_its_type_and_range(cls):
    missing = [name for name, rule in rules_of(cls).items() if rule is None]
    assert missing == [], f"{cls.__name__} fields without a rule: {missing}"


@pytest.mark.parametrize("cls", [TrainConfig, DataConfig, GuardConfig])
def test_defaults_pass_their_own_rules_and_round_trip_through_yaml(cls):
    cfg = cls()
    again = build(cls, yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(("kwargs", "setting", "expected"), [
    ({"max_steps": -5}, "max_steps", "an integer >= 1, or -1 (train num_train_epochs epochs)"),
    ({"learning_rate": math.nan}, "learning_rate", "a finite number > 0"),
    ({"learning_rate": math.inf}, "learning_rate", "a finite number > 0"),
    ({"per_device_train_batch_size": "16"}, "per_device_train_batch_size", "an integer >= 1"),
    ({"per_device_train_batch_size": True}, "per_device_train_batch_size", "an integer >= 1"),
    ({"max_steps": 3.0}, "max_steps", "an integer >= 1"),
    ({"lora_dropout": 1}, "lora_dropout", "a finite number in [0, 1)"),
    ({"data": {"max_length": 1}}, "data.max_length", "an integer >= 2"),
    ({"guard": {"lr_backoff": 1.5}}, "guard.lr_backoff", "a finite number in (0, 1]"),
    ({"precision": "fp8"}, "precision", "one of: auto, bf16, fp16, fp32"),
    ({"data": 5}, "data", "a mapping of DataConfig settings"),
])
def test_bad_values_name_the_setting_the_value_and_the_range(kwargs, setting, expected):
    with pytest.raises(SettingError) as info:
        TrainConfig(**kwargs)
    err = info.value
    assert err.setting == setting and err.expected.startswith(expected)
    assert str(err).startswith(f"{setting} = ")
    assert err.exit_code == 2 and isinstance(err, ConfigError)


def test_a_wrong_type_is_named_and_never_coerced():
    with pytest.raises(SettingError, match=r"got a string \(write the number without quotes\)"):
        TrainConfig(per_device_train_batch_size="16")
    with pytest.raises(SettingError, match="got a boolean"):
        GuardConfig(spike_window=True)
    cfg = TrainConfig(learning_rate=1)  # an int for a float setting is the same number
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


def test_closed_choices_are_enums_that_read_as_their_values():
    cfg = TrainConfig(precision="bfloat16", data={"template": "chat", "truncation": "right"})
    assert cfg.precision is Precision.BF16  # an accepted alias becomes the canonical member
    assert cfg.data.template is Template.CHAT and cfg.data.truncation is Truncation.RIGHT
    assert f"{cfg.precision}" == "bf16" and {"bf16": 1}[cfg.precision] == 1
    assert cfg.to_dict()["data"]["template"] == "chat"


def test_unknown_keys_suggest_the_closest_setting():
    with pytest.raises(UnknownSettingError, match=r"unknown setting 'learnig_rate' .*did you mean "
                                                  r"'learning_rate'"):
        build(TrainConfig, {"learnig_rate": 0.1})
    with pytest.raises(UnknownSettingError, match=r"did you mean 'data\.max_length'"):
        build(TrainConfig, {"data": {"max_lenght": 3}})


def test_rules_between_settings():
    with pytest.raises(SettingError, match="spike_warmup = 60: expected an integer <= spike_window"):
        GuardConfig(spike_warmup=60)
    with pytest.raises(SettingError, match="choose one"):
        TrainConfig(resume=True, overwrite=True)
    with pytest.raises(SettingError, match=r"eval_max_new_tokens = 16: .* data.max_length \(16\)"):
        TrainConfig(eval_max_new_tokens=16, data={"max_length": 16})


def test_yaml_reads_exponent_floats_and_names_file_and_line(tmp_path):
    from finitetune.settings.resolve import resolve_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: tiny\nlearning_rate: 2e-4\nguard:\n  spike_threshold: 1E1\n")
    cfg = resolve_config(str(cfg_file), {})
    assert cfg.learning_rate == 2e-4 and cfg.guard.spike_threshold == 10.0
    cfg_file.write_text("model: tiny\nlearning_rate: '2e-4'\n")  # quoted: a string, refused
    with pytest.raises(SettingError, match=r"learning_rate = '2e-4' \(.*c.yaml:2\)"):
        resolve_config(str(cfg_file), {})
    cfg_file.write_text("model: tiny\ndata:\n  eval_size: -1\n")
    with pytest.raises(SettingError, match=r"data.eval_size = -1 \(.*c.yaml:3\)"):
        resolve_config(str(cfg_file), {})


def test_each_source_is_named(tmp_path):
    from finitetune.settings.resolve import resolve_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("max_steps: 4\n")
    with pytest.raises(SettingError, match=r"max_steps = 0 \(flag --max-steps\)"):
        resolve_config(str(cfg_file), {"max_steps": 0}, {"max_steps": "flag --max-steps"})
    # the preset's value is fine alone; the flag's max_length makes its eval budget too big
    with pytest.raises(SettingError, match=r"eval_max_new_tokens = 3 \(the 'tiny' preset\)"):
        resolve_config(None, {"model": "tiny", "data.max_length": 3})


def test_python_api_names_the_keyword(tmp_path):
    from finitetune.train import train

    with pytest.raises(SettingError, match=r"max_steps = -5 \(train\(max_steps=\.\.\.\)\)"):
        train(model="tiny", max_steps=-5, output_dir=str(tmp_path / "run"))
    with pytest.raises(SettingError, match=r"data.max_length = '64' \(train\(data.max_length="):
        train(model="tiny", data={"max_length": "64"}, output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_reliability_doc_lists_every_setting_with_its_range():
    from pathlib import Path

    from finitetune.settings.validation import settings_table

    doc = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    missing = [f"| `{name}` | {what} |" for name, what in settings_table(TrainConfig)
               if f"| `{name}` | {what} |" not in doc]
    assert missing == [], "add these rows to the settings table in docs/reliability.md:\n" + \
        "\n".join(missing)

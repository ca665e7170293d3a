"""Every bad input: a named error, exit 2, nothing written, nothing lost: negative,
zero or NaN numbers from flags or YAML, output paths that are files, devices, FIFOs or symlinks,
``--resume`` on a user's folder.

One table over every command. Each case builds nothing of its own at run time: the workspace
(data, a user's folder, a finished run, special files) and the broken model folders exist
before the snapshot. The case runs the CLI in-process and must:

- exit with code 2 (argparse's own usage errors included);
- print an error naming the thing (the case's substring) and no traceback;
- leave both file trees exactly as they were: nothing created (not even a directory or a
  temporary file: directory mtimes are compared too), nothing deleted, no file changed, and
  FIFOs, devices and symlinks still what they were.

Most cases fail before any model loads; the few that must load one use the tiny model.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from finitetune.cli.main import main
from finitetune.testing.files import snapshot

IS_ROOT = os.geteuid() == 0


@dataclass(frozen=True)
class Case:
    argv: str
    """The command line; ``{w}`` is the workspace, ``{m}`` the broken-models folder, ``{data}``,
    ``{model}`` the tiny model, ``{base}`` a valid ``train`` command line to add to."""
    expect: str
    """A substring the error message must contain (it names the setting, file or flag)."""
    files: tuple[tuple[str, str], ...] = ()
    """Extra files of this case (relative path, text), written before the snapshot."""
    absent: str = ""
    """A substring the message must NOT contain (advice for a flag the command lacks)."""
    root: bool = False
    """Needs root (device files)."""
    nonroot: bool = False
    """Needs an ordinary user (root may write anywhere; /dev/null would really be replaced)."""


BASE = ("train --model {model} --data {data} --output-dir {w}/new-run --eval-size 8 "
        "--no-eval-before --max-steps 2")
B = "{base}"

SETTINGS = {  # class 1: settings from flags
    "max_steps_negative": Case(f"{B} --max-steps -5", "max_steps = -5 (flag --max-steps): "
                               "expected an integer >= 1, or -1"),
    "max_steps_zero": Case(f"{B} --max-steps 0", "max_steps = 0 (flag --max-steps)"),
    "max_steps_word": Case(f"{B} --max-steps abc", "--max-steps: invalid int value: 'abc'"),
    "eval_size_negative": Case(f"{B} --eval-size -1", "data.eval_size = -1 (flag --eval-size)"),
    "eval_size_zero": Case(f"{B} --eval-size 0", "data.eval_size = 0"),
    "lora_r_negative": Case(f"{B} --lora-r -3", "lora_r = -3 (flag --lora-r): expected an "
                            "integer >= 0"),
    "lora_alpha_zero": Case(f"{B} --lora-alpha 0", "lora_alpha = 0 (flag --lora-alpha)"),
    "lora_dropout_one": Case(f"{B} --lora-dropout 1", "lora_dropout = 1.0 (flag --lora-dropout): "
                             "expected a finite number in [0, 1)"),
    "lora_dropout_nan": Case(f"{B} --lora-dropout nan", "lora_dropout = nan"),
    "lr_negative": Case(f"{B} --learning-rate -1", "learning_rate = -1.0 (flag --learning-rate):"
                        " expected a finite number > 0"),
    "lr_nan": Case(f"{B} --learning-rate nan", "learning_rate = nan (flag --learning-rate)"),
    "lr_inf": Case(f"{B} --learning-rate inf", "learning_rate = inf"),
    "lr_zero": Case(f"{B} --learning-rate 0", "learning_rate = 0.0"),
    "batch_size_zero": Case(f"{B} --batch-size 0", "per_device_train_batch_size = 0 (flag "
                            "--batch-size): expected an integer >= 1"),
    "batch_size_negative": Case(f"{B} --batch-size -4", "per_device_train_batch_size = -4"),
    "batch_size_fraction": Case(f"{B} --batch-size 2.5", "--batch-size: invalid int value"),
    "grad_accum_zero": Case(f"{B} --gradient-accumulation-steps 0", "gradient_accumulation_steps"
                            " = 0 (flag --gradient-accumulation-steps)"),
    "max_grad_norm_negative": Case(f"{B} --max-grad-norm -1", "max_grad_norm = -1.0"),
    "max_grad_norm_nan": Case(f"{B} --max-grad-norm nan", "max_grad_norm = nan"),
    "weight_decay_negative": Case(f"{B} --weight-decay -0.1", "weight_decay = -0.1"),
    "warmup_ratio_above_one": Case(f"{B} --warmup-ratio 1.5", "warmup_ratio = 1.5 (flag "
                                   "--warmup-ratio): expected a finite number in [0, 1]"),
    "warmup_ratio_negative": Case(f"{B} --warmup-ratio -0.1", "warmup_ratio = -0.1"),
    "epochs_zero": Case(f"{B} --num-train-epochs 0", "num_train_epochs = 0.0"),
    "epochs_nan": Case(f"{B} --num-train-epochs nan", "num_train_epochs = nan"),
    "logging_steps_zero": Case(f"{B} --logging-steps 0", "logging_steps = 0"),
    "save_steps_negative": Case(f"{B} --save-steps -1", "save_steps = -1"),
    "seed_negative": Case(f"{B} --seed -1", "seed = -1 (flag --seed): expected an integer in "
                          "[0, 4294967295]"),
    "max_length_one": Case(f"{B} --max-length 1", "data.max_length = 1 (flag --max-length)"),
    "max_length_below_eval_budget": Case(f"{B} --max-length 8", "eval_max_new_tokens = 8 "
                                         "(default): expected an integer < data.max_length (8)"),
    "template_unknown": Case(f"{B} --template fancy", "data.template = 'fancy' (flag --template):"
                             " expected one of: auto, chat, plain"),
    "truncation_unknown": Case(f"{B} --truncation left", "data.truncation = 'left' (flag "
                               "--truncation): expected one of: prompt_left, right"),
    "precision_unknown": Case(f"{B} --precision fp8", "precision = 'fp8' (flag --precision): "
                              "expected one of: auto, bf16, fp16, fp32"),
    "label_policy_unknown": Case(f"{B} --on-label-problem ignore", "data.on_label_problem = "
                                 "'ignore'"),
    "guard_policy_unknown": Case(f"{B} --guard-policy retry", "guard.policy = 'retry' (flag "
                                 "--guard-policy)"),
    "lora_targets_empty": Case(f"{B} --lora-targets ' , '", "lora_targets = ' , '"),
    "prompt_field_empty": Case(f"{B} --prompt-field ''", "data.prompt_field = ''"),
    "model_empty": Case(f"{B} --model ''", "model = '' (flag --model)"),
    "output_dir_empty": Case(f"{B} --output-dir ''", "output_dir = '' (flag --output-dir)"),
    "resume_and_overwrite": Case(f"{B} --resume --overwrite", "--resume continues a run, "
                                 "--overwrite replaces it; choose one"),
    "scheduler_unknown": Case(f"{B} --lr-scheduler-type bumpy", "lr_scheduler_type = 'bumpy': "
                              "expected one of: linear, cosine"),
    "lora_targets_missing": Case(f"{B} --lora-r 4 --lora-targets nope_proj",
                                 "LoRA targets ['nope_proj'] do not fit this model"),
    "unknown_flag": Case(f"{B} --learnig-rate 0.1", "unrecognized arguments: --learnig-rate"),
}


def _yaml(text: str) -> tuple[tuple[str, str], ...]:
    return (("c.yaml", text),)


C = f"{B} --config {{w}}/c.yaml"
YAML = {  # class 1: settings from a YAML file (with the line) and from Python
    "yaml_max_steps_word": Case(C, "max_steps = 'abc' (", _yaml("seed: 1\nmax_steps: abc\n")),
    "yaml_line_number": Case(C, "c.yaml:2): expected an integer", _yaml("seed: 1\nmax_steps: abc\n")),
    "yaml_quoted_number": Case(C, "per_device_train_batch_size = '16' ", _yaml(
        "per_device_train_batch_size: '16'\n")),
    "yaml_quoted_number_hint": Case(C, "got a string (write the number without quotes)", _yaml(
        "per_device_train_batch_size: '16'\n")),
    "yaml_data_int": Case(C, "data = 5 (", _yaml("data: 5\n")),
    "yaml_data_int_with_data_flag": Case(C, "expected a mapping of DataConfig settings", _yaml(
        "data: 5\n")),
    "yaml_data_string": Case(C, "data = 'train.jsonl'", _yaml("data: train.jsonl\n")),
    "yaml_unknown_key": Case(C, "unknown setting 'batch_size'", _yaml("batch_size: 16\n")),
    "yaml_typo_suggests": Case(C, "(did you mean 'learning_rate'?)", _yaml("learnig_rate: 0.1\n")),
    "yaml_nested_typo": Case(C, "unknown setting 'data.max_lenght'", _yaml(
        "data:\n  max_lenght: 64\n")),
    "yaml_nan": Case(C, "learning_rate = nan (", _yaml("learning_rate: .nan\n")),
    "yaml_bool_for_int": Case(C, "max_steps = True", _yaml("max_steps: true\n")),
    "yaml_bool_is_not_int": Case(C, "got a boolean", _yaml("max_steps: true\n")),
    "yaml_float_for_int": Case(C, "got a float", _yaml("max_steps: 5.5\n")),
    "yaml_nested_line": Case(C, "data.max_length = -4 (", _yaml("seed: 0\ndata:\n  max_length: -4\n")),
    "yaml_nested_line_number": Case(C, "c.yaml:3)", _yaml("seed: 0\ndata:\n  max_length: -4\n")),
    "yaml_guard_warmup": Case(C, "guard.spike_warmup = 100", _yaml("guard:\n  spike_warmup: 100\n")),
    "yaml_guard_policy": Case(C, "guard.policy = 'explode'", _yaml("guard:\n  policy: explode\n")),
    "yaml_guard_backoff": Case(C, "guard.lr_backoff = 0 (", _yaml("guard:\n  lr_backoff: 0\n")),
    "yaml_guard_skips": Case(C, "guard.max_consecutive_skips = -1", _yaml(
        "guard:\n  max_consecutive_skips: -1\n")),
    "yaml_guard_int": Case(C, "guard = 7", _yaml("guard: 7\n")),
    "yaml_targets_int": Case(C, "lora_targets = 5", _yaml("lora_targets: 5\n")),
    "yaml_duplicate_key": Case(C, "max_steps is set twice", _yaml("max_steps: 3\nmax_steps: 4\n")),
    "yaml_list": Case(C, "expected a mapping of settings at the top level", _yaml("- 1\n- 2\n")),
    "yaml_syntax": Case(C, "not valid YAML", _yaml("max_steps: [1, 2\n")),
    "yaml_string_flag": Case(C, "overwrite = 'yes'", _yaml("overwrite: 'yes'\n")),
    "yaml_precision_int": Case(C, "precision = 16", _yaml("precision: 16\n")),
    "yaml_seed_range": Case(C, "seed = 99999999999", _yaml("seed: 99999999999\n")),
    "yaml_model_list": Case(C, "model = ['a', 'b']", _yaml("model: [a, b]\n")),
    "yaml_missing": Case(f"{B} --config {{w}}/nope.yaml", "config file not found"),
    "yaml_is_directory": Case(f"{B} --config {{w}}/user", "is not a regular file"),
    "yaml_is_fifo": Case(f"{B} --config {{w}}/fifo", "is not a regular file"),
    "yaml_not_utf8": Case(C, "not UTF-8", (("c.yaml", "\udcff"),)),
}

OUTPUTS = {  # class 2: output paths
    "out_is_file": Case(f"{B} --output-dir {{w}}/notes.txt", "notes.txt is a regular file, not a "
                        "directory"),
    "out_under_file": Case(f"{B} --output-dir {{w}}/notes.txt/run", "notes.txt is a regular "
                           "file, not a directory"),
    "out_is_fifo": Case(f"{B} --output-dir {{w}}/fifo", "is a FIFO (named pipe), not a directory"),
    "out_is_symlink": Case(f"{B} --output-dir {{w}}/link-to-user", "is a symbolic link"),
    "out_is_dangling_symlink": Case(f"{B} --output-dir {{w}}/dangling", "is a symbolic link"),
    "out_user_folder": Case(f"{B} --output-dir {{w}}/user", "was not created by finitetune train"),
    "out_user_folder_overwrite": Case(f"{B} --output-dir {{w}}/user --overwrite",
                                      "never writes into or deletes a folder it did not create"),
    "out_user_folder_resume": Case(f"{B} --output-dir {{w}}/user --resume",
                                   "--resume: {w}/user is not a run directory"),
    "out_empty_folder_resume": Case(f"{B} --output-dir {{w}}/empty --resume",
                                    "is not a run directory created by finitetune train"),
    "out_missing_resume": Case(f"{B} --output-dir {{w}}/missing --resume", "does not exist; "
                               "there is no run to continue"),
    "out_earlier_run": Case(f"{B} --output-dir {{w}}/run", "holds an earlier run; pass --resume"),
    "out_resume_without_checkpoint": Case(f"{B} --output-dir {{w}}/run --resume",
                                          "no checkpoint-* folder"),
    "out_verify_output_overwrite": Case(f"{B} --output-dir {{w}}/verify-out --overwrite",
                                        "was not created by finitetune train"),
    "out_unwritable": Case(f"{B} --output-dir /proc/finitetune-test/run",
                           "--output-dir /proc/finitetune-test/run: cannot"),
    "out_read_only_dir": Case(f"{B} --output-dir {{w}}/readonly/run", "permission denied",
                              nonroot=True),
    "out_device": Case(f"{B} --output-dir {{w}}/device", "is a character device", root=True),
    "report_o_directory": Case("report {w}/run -o {w}/user", "is a directory, not a regular "
                               "file"),
    "report_o_fifo": Case("report {w}/run -o {w}/fifo", "FIFO (named pipe), not a regular file"),
    "report_o_symlink": Case("report {w}/run -o {w}/link-to-notes", "is a symbolic link"),
    "report_o_dangling": Case("report {w}/run -o {w}/dangling", "is a symbolic link"),
    "report_o_under_file": Case("report {w}/run -o {w}/notes.txt/r.md", "not a directory"),
    "report_o_device": Case("report {w}/run -o {w}/device", "is a character device", root=True),
    "report_o_dev_null": Case("report {w}/run -o /dev/null", "/dev/null is a character "
                              "device", nonroot=True),
    "report_o_read_only": Case("report {w}/run -o {w}/readonly/r.md", "permission denied",
                               nonroot=True),
    "verify_out_file": Case("verify --output-dir {w}/notes.txt", "is a regular file"),
    "verify_out_user": Case("verify --output-dir {w}/user", "was not created by finitetune "
                            "verify"),
    "verify_out_train_run": Case("verify --output-dir {w}/run", "was not created by finitetune "
                                 "verify"),
    "verify_out_fifo": Case("verify --output-dir {w}/fifo", "FIFO"),
}

T = "--trust-remote-code"
LOADERS = {  # class 4: model folders and event files
    "pickle_train": Case(f"{B} --model {{m}}/pickled", "holds only pickled weights"),
    "pickle_says_convert": Case(f"{B} --model {{m}}/pickled", "convert it once to safetensors"),
    "pickle_malicious_train": Case(f"{B} --model {{m}}/evil", "finitetune never unpickles"),
    "pickle_env": Case("env --model {m}/evil", "holds only pickled weights"),
    "pickle_check": Case("check --model {m}/evil --data {data}", "holds only pickled weights"),
    "pickle_verify": Case("verify --model {m}/evil", "holds only pickled weights"),
    "remote_train": Case(f"{B} --model {{m}}/remote", f"re-run with {T}"),
    "remote_env": Case("env --model {m}/remote", f"re-run with {T}"),
    "remote_verify": Case("verify --model {m}/remote", "this command does not run a model's "
                          "own code", absent=T),
    "no_tokenizer_check": Case("check --model {m}/notok --data {data}", "or pass --tokenizer DIR"),
    "no_tokenizer_train": Case(f"{B} --model {{m}}/notok", "has no tokenizer files",
                               absent="--tokenizer"),
    "no_tokenizer_env": Case("env --model {m}/notok", "has no tokenizer files",
                             absent="--tokenizer"),
    "no_tokenizer_verify": Case("verify --model {m}/notok", "has no tokenizer files",
                                absent="--tokenizer"),
    "tokenizer_path_missing": Case("check --tokenizer ./no/such/tok --data {data}",
                                   "tokenizer directory not found: ./no/such/tok"),
    "model_path_missing": Case(f"{B} --model ./no/such/model", "model directory not found"),
    "model_is_file": Case(f"{B} --model {{w}}/notes.txt", "is not a directory"),
    "model_no_weights": Case(f"{B} --model {{m}}/noweights", "has no weights"),
    "model_no_config": Case(f"{B} --model {{m}}/nocfg", "has no config.json"),
    "explain_wrong_list": Case("explain {w}/ev-list", "events.jsonl:1: field 'nonfinite_params' "
                               "is 5, expected a list"),
    "explain_wrong_object": Case("explain {w}/ev-attr", "events.jsonl:2: field 'attribution'"),
    "explain_wrong_items": Case("explain {w}/ev-ids", "field 'sample_ids'"),
    "explain_wrong_samples": Case("explain {w}/ev-samples", "field 'bad_samples'"),
    "explain_step_string": Case("explain {w}/ev-step", "not a guard event"),
    "explain_json_wrong_list": Case("explain {w}/ev-list --json", "field 'nonfinite_params'"),
    "explain_data_file": Case("explain {data}", "d.jsonl:1: not a guard event"),
    "explain_regular_file": Case("explain {w}/notes.txt", "is a file, not a run directory"),
    "explain_fifo": Case("explain {w}/fifo", "is a FIFO (named pipe), not a run directory"),
    "explain_missing": Case("explain {w}/missing", "does not exist"),
    "explain_user_folder": Case("explain {w}/user", "is not a finitetune run directory"),
    "explain_torn_json": Case("explain {w}/ev-torn", "events.jsonl:2: not valid JSON"),
}

COMMANDS = {  # check, report, env, verify: their own settings
    "check_max_length": Case("check --model {model} --data {data} --max-length 1",
                             "max_length = 1 (flag --max-length)"),
    "check_template": Case("check --model {model} --data {data} --template fancy",
                           "template = 'fancy' (flag --template): expected one of"),
    "check_truncation": Case("check --model {model} --data {data} --truncation left",
                             "truncation = 'left' (flag --truncation)"),
    "check_min_supervised": Case("check --model {model} --data {data} --min-supervised 0",
                                 "min_response_tokens = 0 (flag --min-supervised)"),
    "check_max_bad_nan": Case("check --model {model} --data {data} --max-bad nan",
                              "--max-bad nan: expected a percentage in [0, 100]"),
    "check_max_bad_range": Case("check --model {model} --data {data} --max-bad 150",
                                "--max-bad 150.0"),
    "check_prompt_field": Case("check --model {model} --data {data} --prompt-field ''",
                               "prompt_field = '' (flag --prompt-field)"),
    "check_marker_empty": Case("check --model {model} --data {data} --response-marker ''",
                               "response_marker = '' (flag --response-marker)"),
    "check_no_source": Case("check --data {data}", "one of the arguments --model --tokenizer is "
                            "required"),
    "report_vocab": Case("report {w}/run --vocab-size 1", "--vocab-size 1: expected an integer"),
    "report_clip_nan": Case("report {w}/run --max-grad-norm nan", "--max-grad-norm nan"),
    "report_clip_negative": Case("report {w}/run --max-grad-norm -1", "--max-grad-norm -1.0"),
    "report_missing": Case("report {w}/missing", "no such file or directory"),
    "report_garbage": Case("report {w}/garbage.txt", "garbage.txt: no training log entry"),
    "report_format": Case("report {w}/run --format pdf", "invalid choice: 'pdf'"),
    "env_precision": Case("env --precision fp8", "unknown precision 'fp8'"),
    "env_device": Case("env --device tpu", "unknown device 'tpu'"),
    "env_model_missing": Case("env --model ./no/such/model", "model directory not found"),
    "verify_steps": Case("verify --steps 1", "--steps 1: expected at least 5"),
    "verify_scenario": Case("verify --scenario bogus", "unknown scenario 'bogus'"),
    "verify_data_missing": Case("verify --data {w}/nope.jsonl", "data file not found"),
    "no_verb": Case("", "usage:"),
    "unknown_verb": Case("tran", "invalid choice: 'tran'"),
}


def _data(name: str, text: str) -> tuple[tuple[str, str], ...]:
    return ((name, text),)


D = f"{B} --data {{w}}/bad.jsonl"
OK = '{"prompt": "a", "response": "b"}\n'
DATA = {  # the data cases that already passed: they must keep passing
    "data_missing": Case(f"{B} --data {{w}}/nope.jsonl", "data file not found"),
    "data_unknown_format": Case(f"{B} --data {{w}}/notes.txt", "unknown data format '.txt'"),
    "data_not_json": Case(D, "bad.jsonl:2: not valid JSON", _data("bad.jsonl", OK + "{oops\n")),
    "data_missing_field": Case(D, "bad.jsonl:2: missing field 'response'", _data(
        "bad.jsonl", OK + '{"prompt": "a"}\n')),
    "data_non_string": Case(D, "bad.jsonl:1: field 'response' is int", _data(
        "bad.jsonl", '{"prompt": "a", "response": 3}\n')),
    "data_empty": Case(D, "holds no examples", _data("bad.jsonl", "\n")),
    "data_array_line": Case(D, "bad.jsonl:1: expected a JSON object, got list", _data(
        "bad.jsonl", "[1, 2]\n")),
    "data_messages_not_list": Case(D, "field 'messages' must be a non-empty list", _data(
        "bad.jsonl", '{"messages": {"role": "user"}}\n')),
    "data_no_assistant": Case(D, "no assistant message", _data(
        "bad.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n')),
    "data_bad_message": Case(D, "message 0 must have string 'role' and 'content'", _data(
        "bad.jsonl", '{"messages": [{"role": "user", "content": 5}]}\n')),
    "data_directory": Case(f"{B} --data {{w}}/user", "is a directory but not a saved dataset"),
    "data_fifo": Case(f"{B} --data {{w}}/fifo.jsonl", "is not a regular file or a directory"),
    "data_check_fifo": Case("check --model {model} --data {w}/fifo.jsonl", "is not a regular "
                            "file or a directory"),
    "data_check_bad_line": Case("check --model {model} --data {w}/bad.jsonl", "bad.jsonl:2: "
                                "not valid JSON", _data("bad.jsonl", OK + "nope\n")),
    "data_label_error": Case(f"{D} --on-label-problem error", "use on_label_problem=drop or fix",
                             _data("bad.jsonl", '{"prompt": "a", "response": ""}\n' * 20 + OK * 20)),
    "data_nothing_usable": Case(D, "no usable training example", _data(
        "bad.jsonl", '{"prompt": "a", "response": ""}\n' * 40)),
    "data_csv_not_utf8": Case(f"{B} --data {{w}}/bad.csv", "not valid UTF-8", _data(
        "bad.csv", "prompt,response\n\udcff,b\n")),
    "data_no_embedded_task": Case("train --model {model} --output-dir {w}/new-run",
                                  "has no embedded task: pass --data FILE"),
}

CASES = {**SETTINGS, **YAML, **OUTPUTS, **LOADERS, **COMMANDS, **DATA}


# ----------------------------------------------------------------------------- fixtures --
def _copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def broken_models(tmp_path_factory, tiny_model_dir) -> Path:
    """Model folders a user might point finitetune at, each wrong in one way."""
    import torch
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("broken-models")
    pickled = _copy_model(tiny_model_dir, root / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    evil = _copy_model(tiny_model_dir, root / "evil")
    (evil / "model.safetensors").unlink()

    class Payload:  # unpickling this would create a file: the snapshot would show it
        def __reduce__(self):
            return (Path.touch, (root / "PWNED",))

    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    remote = _copy_model(tiny_model_dir, root / "remote")
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="my_custom", auto_map={"AutoConfig": "my_code.MyConfig",
                                                 "AutoModelForCausalLM": "my_code.MyModel"})
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "my_code.py").write_text("raise SystemExit('the model code ran')\n")
    notok = _copy_model(tiny_model_dir, root / "notok")
    for f in notok.glob("tokenizer*"):
        f.unlink()
    noweights = _copy_model(tiny_model_dir, root / "noweights")
    (noweights / "model.safetensors").unlink()
    nocfg = _copy_model(tiny_model_dir, root / "nocfg")
    (nocfg / "config.json").unlink()
    return root


def _events(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


GOOD_EVENT = {"step": 3, "kind": "guard", "action": "skip", "reason": "nonfinite_grad"}
MARKER = ".finitetune-run.json"


def _workspace(w: Path, case: Case) -> dict[str, str]:
    """The user's files every case sees (and must leave as they were)."""
    from finitetune.builtin.tasks import tiny_task

    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in tiny_task(48, seed=3)]
    (w / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (w / "notes.txt").write_text("my notes\n")
    (w / "user").mkdir()
    (w / "user" / "thesis.tex").write_text("precious\n")
    (w / "empty").mkdir()
    run = w / "run"  # a finished finitetune run (no checkpoint kept)
    run.mkdir()
    (run / MARKER).write_text('{"created_by": "finitetune train"}\n')
    (run / "config.yaml").write_text("model: tiny\nmax_grad_norm: 1.0\n")
    (run / "metrics.jsonl").write_text(_events(*[
        {"step": s, "loss": 3.0 / s, "grad_norm": 1.0 + 0.1 * s, "learning_rate": 1e-3}
        for s in range(1, 11)]))
    (run / "events.jsonl").write_text(_events(GOOD_EVENT))
    verify_out = w / "verify-out"
    verify_out.mkdir()
    (verify_out / MARKER).write_text('{"created_by": "finitetune verify"}\n')
    (verify_out / "verify.json").write_text("{}\n")
    for name, bad in {"ev-list": {**GOOD_EVENT, "nonfinite_params": 5},
                      "ev-attr": {**GOOD_EVENT, "attribution": "replayed"},
                      "ev-ids": {**GOOD_EVENT, "sample_ids": [[1]]},
                      "ev-samples": {**GOOD_EVENT, "bad_samples": [1]},
                      "ev-step": {**GOOD_EVENT, "step": "3"}}.items():
        (w / name).mkdir()
        lines = [bad] if name == "ev-list" else [GOOD_EVENT, bad]
        (w / name / "events.jsonl").write_text(_events(*lines))
    (w / "ev-torn").mkdir()
    (w / "ev-torn" / "events.jsonl").write_text(_events(GOOD_EVENT, '{"step": 4, "act'))
    (w / "garbage.txt").write_text("hello\nno log in here\n")
    os.mkfifo(w / "fifo")
    os.mkfifo(w / "fifo.jsonl")
    os.symlink(w / "user", w / "link-to-user")
    os.symlink(w / "notes.txt", w / "link-to-notes")
    os.symlink(w / "nowhere", w / "dangling")
    (w / "readonly").mkdir(mode=0o555)
    if IS_ROOT:
        os.mknod(w / "device", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
    for name, content in case.files:
        (w / name).write_bytes(content.encode("utf-8", "surrogateescape"))
    return {"w": str(w), "data": str(w / "d.jsonl")}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_named_exit_2_and_changes_nothing(
        name, tmp_path, broken_models, tiny_model_dir, capsys, monkeypatch, one_thread):
    case = CASES[name]
    if case.root and not IS_ROOT:
        pytest.skip("device files need root to create")
    if case.nonroot and IS_ROOT:
        pytest.skip("root may write anywhere")
    w = tmp_path / "ws"
    w.mkdir()
    paths = _workspace(w, case)
    monkeypatch.chdir(w)  # a default output directory would land in the snapshot
    fields = {**paths, "m": str(broken_models), "model": tiny_model_dir}
    fields["base"] = BASE.format(**fields)
    argv = shlex.split(case.argv.format(**fields))
    before = snapshot(w, broken_models)

    code, out, err = _run(argv, capsys)

    message = err + out  # env prints its report (with the error) on stdout
    assert code == 2, f"exit {code}: {message[-2000:]}"
    assert case.expect.format(**fields) in message, message[-2000:]
    assert "Traceback" not in message
    if case.absent:
        assert case.absent not in message, message
    after = snapshot(w, broken_models)
    assert sorted(set(after) - set(before)) == [], "created"
    assert sorted(set(before) - set(after)) == [], "deleted"
    changed = [p for p in before if before[p] != after[p]]
    assert changed == [], f"changed: {changed}"


def test_the_table_covers_every_command_and_class():
    verbs = {shlex.split(c.argv.replace("{base}", "train"))[0] for c in CASES.values()
             if c.argv}
    assert {"train", "check", "report", "explain", "env", "verify"} <= verbs
    for table in (SETTINGS, YAML, OUTPUTS, LOADERS, COMMANDS, DATA):
        assert len(table) >= 10
    assert len(CASES) >= 100

"""End-to-end `finitetune train` on the tiny model: run directory, formats, resume, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from finitetune.cli.main import main

RUN_FILES = ["config.yaml", "metrics.jsonl", "eval.json", "label_report.json", "precision.json",
             "report.md", "report.json", "report.html"]


def _strict_json_lines(path: Path) -> list[dict]:
    def reject(token):
        raise AssertionError(f"bare {token} token in {path}")

    return [json.loads(line, parse_constant=reject)
            for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tiny_rows(n: int = 64) -> list[dict]:
    from finitetune.builtin.tasks import tiny_task

    return [{"prompt": r["prompt"], "response": r["response"]} for r in tiny_task(n, seed=7)]


def test_tiny_default_learns_and_writes_a_complete_run_dir(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--output-dir", str(out)]) == 0
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    metrics = _strict_json_lines(out / "metrics.jsonl")
    assert metrics[0]["step"] == 1 and metrics[-1]["step"] == 60
    assert all({"step", "loss", "grad_norm", "learning_rate", "epoch"} <= set(m) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"] / 10
    ev = json.loads((out / "eval.json").read_text())
    assert ev["before"]["exact_match"] < 0.5
    assert ev["after"]["exact_match"] >= 0.9
    assert ev["global_step"] == 60
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"] == "tiny" and cfg["max_steps"] == 60 and cfg["data"]["max_length"] == 32
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))
    assert (out / "checkpoint-60" / "model.safetensors").is_file()


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "hf_disk", "messages"])
def test_trains_from_local_model_dir_and_each_data_format(tmp_path, tiny_model_dir, fmt):
    rows = _tiny_rows()
    if fmt == "jsonl":
        data = _write_jsonl(tmp_path / "d.jsonl", rows)
    elif fmt == "messages":
        data = _write_jsonl(tmp_path / "d.jsonl", [
            {"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["response"]}]} for r in rows])
    else:
        from datasets import Dataset

        ds = Dataset.from_list(rows)
        data = tmp_path / {"csv": "d.csv", "parquet": "d.parquet", "hf_disk": "d_disk"}[fmt]
        {"csv": ds.to_csv, "parquet": ds.to_parquet, "hf_disk": ds.save_to_disk}[fmt](str(data))
    model_copy = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, model_copy)
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_copy), "--data", str(data), "--output-dir",
                 str(out), "--max-steps", "3", "--eval-size", "8", "--max-length", "32",
                 "--lora-r", "0", "--no-eval-before", "--logging-steps", "1"])
    assert code == 0
    metrics = _strict_json_lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    label = json.loads((out / "label_report.json").read_text())
    assert label["total"] == 64 - 8  # 8 rows held out for evaluation
    assert (out / "final" / "model.safetensors").is_file()



def test_resume_continues_from_the_checkpoint_step(tmp_path, tiny_model_dir):
    data = _write_jsonl(tmp_path / "d.jsonl", _tiny_rows())
    out = tmp_path / "run"
    common = ["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir", str(out),
              "--eval-size", "8", "--lora-r", "0", "--logging-steps", "1", "--save-steps", "2",
              "--no-eval-before", "--lr-scheduler-type", "constant"]
    assert main([*common, "--max-steps", "4"]) == 0
    first = _strict_json_lines(out / "metrics.jsonl")
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    shutil.rmtree(out / "checkpoint-4")  # as if the run had died after step 3
    assert main([*common, "--max-steps", "6", "--resume"]) == 0
    resumed = _strict_json_lines(out / "metrics.jsonl")
    # steps 3-4 after checkpoint-2 are logged again, once; the count continues to 6
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed[:2] == first[:2]
    assert json.loads((out / "eval.json").read_text())["global_step"] == 6


BAD_JSONL = {
    "not_json": ('{"prompt": "a", "response": "b"}\n{oops\n', r"d.jsonl:2: not valid JSON"),
    "missing_field": ('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n',
                      r"d.jsonl:2: missing field 'response'"),
    "non_string": ('{"prompt": "a", "response": 3}\n', r"d.jsonl:1: field 'response' is int"),
    "empty": ("\n", r"no examples"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_data_is_a_named_error_with_exit_2_and_nothing_written(
        tmp_path, tiny_model_dir, capsys, case):
    text, expected = BAD_JSONL[case]
    data = tmp_path / "d.jsonl"
    data.write_text(text)
    out = tmp_path / "run"
    code = main(["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(expected, err), err
    assert not out.exists()


def test_undecodable_bytes_name_the_line(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "b"}\n')
    assert main(["train", "--model", tiny_model_dir, "--data", str(data)]) == 2
    assert "d.jsonl:2: not valid UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing_file", "unknown_format", "no_weights",
                                  "no_tokenizer", "not_a_model", "bad_yaml_key"])
def test_bad_paths_and_settings_exit_2(tmp_path, tiny_model_dir, capsys, case):
    data = _write_jsonl(tmp_path / "d.jsonl", _tiny_rows(8))
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    args = ["train", "--model", str(model), "--data", str(data), "--output-dir",
            str(tmp_path / "run")]
    if case == "missing_file":
        args[4], expected = str(tmp_path / "nope.jsonl"), "data file not found"
    elif case == "unknown_format":
        (tmp_path / "d.txt").write_text("x")
        args[4], expected = str(tmp_path / "d.txt"), "unknown data format '.txt'"
    elif case == "no_weights":
        (model / "model.safetensors").unlink()
        expected = "has no weights"
    elif case == "no_tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (model / f).unlink()
        expected = "has no tokenizer files"
    elif case == "not_a_model":
        args[2], expected = str(tmp_path), "has no config.json"
    else:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("learning_rate: 0.1\nlearnig_rate: 0.2\n")
        args += ["--config", str(cfg)]
        expected = "unknown setting 'learnig_rate'"
    assert main(args) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path, tiny_model_dir, capsys):
    """A run directory finitetune made (it carries the owner marker) is kept unless --resume
    or --overwrite; a look-alike without the marker is not finitetune's to touch at all."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: tiny\n")
    args = ["train", "--model", "tiny", "--output-dir", str(out), "--max-steps", "1"]
    assert main(args) == 2
    assert "was not created by finitetune train" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 2
    assert "never writes into or deletes a folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    (out / ".finitetune-run.json").write_text('{"created_by": "finitetune train"}\n')
    assert main(args) == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err


def test_yaml_config_is_overridden_by_flags(tmp_path):
    from finitetune.settings.resolve import resolve_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: tiny\nlearning_rate: 0.5\nmax_steps: 7\ndata:\n  max_length: 20\n")
    cfg = resolve_config(str(cfg_file), {"max_steps": 9})
    assert (cfg.learning_rate, cfg.max_steps, cfg.data.max_length) == (0.5, 9, 20)
    assert cfg.per_device_train_batch_size == 16  # from the tiny preset


@pytest.mark.parametrize("attribution", [True, False])
def test_guarded_main_job_halts_on_a_poisoned_model_and_keeps_every_file(
        tmp_path, tiny_model_dir, capsys, attribution):
    """One weight set to inf (the seed's `loss 0.0, grad_norm nan` pattern): the guard skips
    every step, halts after max_consecutive_skips, exit 1, and the run directory is complete."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "poisoned"
    shutil.copytree(tiny_model_dir, model)
    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if "layers.0.mlp.up_proj" in k)
    weights[name][0, 0] = float("inf")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    data = _write_jsonl(tmp_path / "d.jsonl", _tiny_rows())
    out = tmp_path / "run"
    code = main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "20", "--eval-size", "8", "--lora-r", "0", "--logging-steps",
                 "1", "--no-eval-before", *([] if attribution else ["--no-attribution"])])
    assert code == 1
    assert "halt" in capsys.readouterr().err.lower()
    events = _strict_json_lines(out / "events.jsonl")
    # max_consecutive_skips=5 bad steps are skipped; the 6th in a row halts
    assert [e["action"] for e in events] == ["skip"] * 5 + ["halt"]
    assert all(e["reason"] in ("nonfinite_loss", "nonfinite_grad") for e in events)
    if attribution:  # the inf weight is found before any replay is needed
        assert all(name in e["nonfinite_weights"][0] for e in events)
        assert (out / "faults" / "step_1.safetensors").is_file()
    else:
        assert not any("verdict" in e or "nonfinite_weights" in e for e in events)
        assert not (out / "faults").exists()
    metrics = _strict_json_lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(m["loss"] is None and m["loss_nonfinite"] == "nan" for m in metrics)
    assert metrics[-1]["guard/skipped"] == 6
    # a halted run hands on no model: no final/, and no checkpoint of the poisoned state
    assert not (out / "final").exists()
    assert not list(out.glob("checkpoint-*"))
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "halted" and status["step"] == 6
    assert "training halted at step 6" in status["error"]
    # the weights, not the data, were at fault: no sample is blamed for it
    bad = [json.loads(line) for line in (out / "bad_samples.jsonl").read_text().splitlines()]
    assert bad and all(b["cause"] == "nonfinite_state" for b in bad)
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "unhealthy"
    assert (out / "eval.json").is_file() and (out / "report.md").is_file()


def test_guarded_clean_run_logs_guard_counters(tmp_path, tiny_model_dir):
    data = _write_jsonl(tmp_path / "d.jsonl", _tiny_rows())
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir",
                 str(out), "--max-steps", "4", "--eval-size", "8", "--lora-r", "0",
                 "--logging-steps", "2", "--no-eval-before"]) == 0
    metrics = _strict_json_lines(out / "metrics.jsonl")
    assert all(m["guard/skipped"] == 0 and m["skipped"] == 0 for m in metrics)
    assert all(m["tokens"] > 0 for m in metrics)
    assert not (out / "events.jsonl").exists()


def test_unreachable_hub_id_fails_fast_with_exit_2(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", _tiny_rows(8))
    code = main(["train", "--model", "some-org/not-a-local-model", "--data", str(data),
                 "--output-dir", str(tmp_path / "run")])
    assert code == 2
    assert "cannot load a tokenizer from some-org/not-a-local-model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["train", "--model", "./no/such/dir", "--data", str(data)]) == 2
    assert "model directory not found: ./no/such/dir" in capsys.readouterr().err


def test_cli_goes_offline_when_everything_is_local(monkeypatch, tmp_path):
    from finitetune.cli.main import set_offline_if_local

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    set_offline_if_local("some-org/model", None)
    assert "HF_HUB_OFFLINE" not in os.environ  # a hub id may need the network
    set_offline_if_local("tiny", str(tmp_path))
    assert os.environ["HF_HUB_OFFLINE"] == "1"

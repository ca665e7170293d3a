"""Label validation: each reason, the policies, `finitetune check`, and the main job's refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finitetune import validate_labels
from finitetune.cli.main import main
from finitetune.data.collate import CausalLMCollator
from finitetune.data.pipeline import prepare_rows, tokenize_with
from finitetune.errors import LabelError
from finitetune.settings.config import DataConfig


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from finitetune.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def rec(prompt: str, response: str, source: str = "x") -> dict:
    return {"prompt": prompt, "response": response, "source": source}


def rows_for(records, tok, **data_kw):
    return tokenize_with(records, tok, DataConfig(**{"template": "plain", **data_kw}))


def report_for(rows, tok, **kw):
    return validate_labels(rows, vocab_size=len(tok), eos_token_id=tok.eos_token_id, **kw)


def test_clean_examples_have_no_reason(tok):
    rows = rows_for([rec("Words: red, blue\nGroup:", " color")] * 3, tok)
    report = report_for(rows, tok)
    assert (report.total, report.usable, report.ok, report.counts) == (3, 3, True, {})
    assert report.supervised_tokens == sum(sum(t != -100 for t in r["labels"]) for r in rows)


def test_empty_response_is_all_masked_with_its_cause(tok):
    rows = rows_for([rec("Words: red\nGroup:", " color"), rec("Words: fig\nGroup:", "", "f:7")],
                    tok)
    report = report_for(rows, tok)
    assert report.indices == {"all_masked": [1], "empty_response": [1]}
    assert report.sources["empty_response"] == ["f:7"]
    assert report.usable == 1
    assert "1 of 2 examples have an empty response" in report.explain()


def test_right_truncation_cuts_the_response_away_and_says_so(tok):
    long_prompt = "Words: " + ", ".join(["apple"] * 40) + "\nGroup:"
    rows = rows_for([rec(long_prompt, " fruit")] * 4 + [rec("Words: red\nGroup:", " color")],
                    tok, max_length=16, truncation="right")
    report = report_for(rows, tok)
    assert report.indices["truncated_away"] == [0, 1, 2, 3]
    assert report.indices["all_masked"] == [0, 1, 2, 3]
    assert report.details["max_length"] == 16
    assert report.details["median_prompt_len"] == rows[0]["prompt_len"] > 16
    msg = report.explain()
    assert "4 of 5 examples lose their response to truncation at max_length=16" in msg
    assert f"median prompt is {rows[0]['prompt_len']} tokens" in msg
    # the default (prompt_left) keeps the response instead
    kept = report_for(rows_for([rec(long_prompt, " fruit")], tok, max_length=16), tok)
    assert kept.ok and kept.usable == 1


def test_marker_that_tokenizes_differently_in_context(tok):
    text = "Words: red, blue, teal\nThe group color: color"
    marker = "group color:"
    alone = tok(marker, add_special_tokens=False)["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # the trap: the marker's ids alone never occur inside the text's ids
    assert not any(ids[i:i + len(alone)] == alone for i in range(len(ids)))
    # a token-id search (what completion-only collators do) therefore masks everything ...
    naive = [{"input_ids": ids, "labels": [-100] * len(ids)}]
    assert report_for(naive, tok).indices["all_masked"] == [0]
    # ... while the pipeline finds the marker by character position and supervises the answer
    rows = rows_for([{"text": text, "source": "t:1"}, {"text": "no marker here", "source": "t:2"}],
                    tok, response_marker=marker)
    assert tok.decode([t for t in rows[0]["labels"] if t != -100]) == " color<|endoftext|>"
    report = report_for(rows, tok)
    assert report.indices == {"all_masked": [1], "template_marker_not_found": [1]}
    assert report.sources["template_marker_not_found"] == ["t:2"]


def test_pad_equal_to_eos_keeps_the_eos_label_when_padding_is_masked_by_position(tok):
    rows = rows_for([rec("Words: red\nGroup:", " color"), rec("Words: a, b, c, d\nGroup:", " x")],
                    tok)
    pad = tok.eos_token_id  # pad = eos, as in SmolLM2 and Llama-3
    batch = CausalLMCollator(pad)(rows)
    ours = [{"input_ids": i.tolist(), "labels": lab.tolist()}
            for i, lab in zip(batch["input_ids"], batch["labels"])]
    assert not report_for(ours, tok).counts
    # masking padding by token id (labels[input_ids == pad] = -100) also masks every EOS
    naive = [{"input_ids": r["input_ids"], "labels": [-100 if t == pad else lab for t, lab in
                                                     zip(r["input_ids"], r["labels"])]}
             for r in ours]
    report = report_for(naive, tok)
    assert report.indices["eos_not_supervised"] == [0, 1]
    assert report.ok  # a warning: still trainable, but the model never learns to stop


def test_labels_out_of_range_and_length_mismatch_and_few_supervised(tok):
    v = len(tok)
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, v + 3]},       # >= vocab
        {"input_ids": [5, 6, 7], "labels": [-100, -5, 7]},          # negative, not ignore
        {"input_ids": [5, 6, 7], "labels": [-100, 6]},              # length mismatch
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, -100, 8]},  # 1 token < min 2
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
    ]
    report = validate_labels(rows, vocab_size=v, min_supervised=2)
    assert report.indices["label_out_of_range"] == [0, 1]
    assert report.indices["length_mismatch"] == [2]
    assert report.indices["few_supervised"] == [2, 3]
    assert report.usable == 2 and report.unusable_indices() == [0, 1, 2]


def test_empty_data_set(tok):
    report = validate_labels([])
    assert (report.total, report.usable) == (0, 0)
    with pytest.raises(LabelError, match="empty"):
        report.raise_if_unusable()


def test_dataset_input_matches_list_input(tok):
    from datasets import Dataset

    records = [rec("Words: red\nGroup:", " color", f"f:{i}") for i in range(5)]
    records[2]["response"] = ""
    rows = rows_for(records, tok)
    rows.append({**rows[0], "labels": [-100] * len(rows[0]["labels"]), "response_len": 3})
    as_list = report_for(rows, tok)
    as_ds = report_for(Dataset.from_list(rows), tok)
    assert as_ds.to_dict() == as_list.to_dict()
    assert as_ds.indices["all_masked"] == [2, 5]


def test_raise_if_unusable_names_the_dominant_cause_and_fix(tok):
    rows = rows_for([rec("p " * 50, "answer")] * 3 + [rec("Words: x\nGroup:", "")], tok,
                    max_length=10, truncation="right")
    report = report_for(rows, tok)
    with pytest.raises(LabelError, match=r"3 of 4 examples lose their response to truncation.*"
                                         r"raise max_length"):
        report.raise_if_unusable()


def test_policies_drop_error_fix(tok):
    long_prompt = "Words: " + ", ".join(["apple"] * 40) + "\nGroup:"
    records = [rec("Words: red\nGroup:", " color", "d:1"), rec(long_prompt, " fruit", "d:2"),
               rec("Words: fig\nGroup:", "", "d:3")]
    cfg = dict(template="plain", max_length=16, truncation="right")
    rows, report, summary = prepare_rows(records, tok, DataConfig(on_label_problem="drop", **cfg))
    assert [r["source"] for r in rows] == ["d:1"]
    assert (summary["dropped"], summary["fixed"], summary["usable"]) == (2, 0, 1)
    with pytest.raises(LabelError, match=r"examples d:2, d:3"):
        prepare_rows(records, tok, DataConfig(on_label_problem="error", **cfg))
    rows, report, summary = prepare_rows(records, tok, DataConfig(on_label_problem="fix", **cfg))
    assert [r["source"] for r in rows] == ["d:1", "d:2"]
    assert (summary["fixed"], summary["dropped"]) == (1, 1)
    fixed = rows[1]
    assert len(fixed["input_ids"]) == 16 and fixed["labels"][-1] == tok.eos_token_id
    assert report.indices["truncated_away"] == [1]  # the report describes the data as given


def _mixed_jsonl(tmp_path: Path) -> Path:
    lines = [
        {"prompt": "Words: red, blue\nGroup:", "response": " color"},
        {"prompt": "Words: fig\nGroup:", "response": ""},
        {"prompt": "Words: " + ", ".join(["apple"] * 60) + "\nGroup:", "response": " fruit"},
        {"prompt": "Words: saw\nGroup:", "response": " tool"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_check_cli_reports_counts_and_lines_and_exits_1(tmp_path, tiny_model_dir, capsys):
    path = _mixed_jsonl(tmp_path)
    code = main(["check", "--data", str(path), "--model", tiny_model_dir, "--max-length", "16",
                 "--truncation", "right", "--template", "plain"])
    out = capsys.readouterr().out
    assert code == 1
    assert "4 examples, 2 usable" in out
    assert "all_masked" in out and "       2    50.0%" in out
    assert f"empty_response: {path}:2" in out
    assert f"truncated_away: {path}:3" in out
    assert main(["check", "--data", str(path), "--model", tiny_model_dir, "--max-length", "16",
                 "--truncation", "right", "--max-bad", "60"]) == 0
    capsys.readouterr()
    assert main(["check", "--data", str(path), "--tokenizer", tiny_model_dir, "--json",
                 "--max-length", "16", "--truncation", "right"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["truncated_away"] == 1 and data["bad_percent"] == 50.0


def test_check_cli_clean_file_exits_0_and_unreadable_exits_2(tmp_path, tiny_model_dir, capsys):
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps({"prompt": "Words: red\nGroup:", "response": " color"}) + "\n")
    assert main(["check", "--data", str(clean), "--model", tiny_model_dir]) == 0
    assert "no label problems found" in capsys.readouterr().out
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{nope\n")
    assert main(["check", "--data", str(broken), "--model", tiny_model_dir]) == 2
    assert "broken.jsonl:1: not valid JSON" in capsys.readouterr().err


def test_train_refuses_data_with_nothing_usable(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Words: {i}\nGroup:", "response": ""}) + "\n"
                            for i in range(20)))
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--data", str(path), "--output-dir",
                 str(out), "--eval-size", "2"]) == 2
    assert "no usable training example: 18 of 18 examples have an empty response" in \
        capsys.readouterr().err
    assert not out.exists()


def test_train_drops_bad_rows_and_says_how_many(tmp_path, tiny_model_dir, capsys):
    from finitetune.builtin.tasks import tiny_task

    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in tiny_task(40, seed=3)]
    for i in (0, 5, 9):
        rows[i]["response"] = ""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--data", str(path), "--output-dir",
                 str(out), "--eval-size", "4", "--max-steps", "2", "--lora-r", "0",
                 "--no-eval-before"]) == 0
    label = json.loads((out / "label_report.json").read_text())
    # 3 empty responses in 40 rows; those not held out for evaluation are dropped
    assert label["policy"]["dropped"] == label["counts"]["empty_response"] >= 1
    assert label["usable"] == label["total"] - label["policy"]["dropped"]
    assert f"dropped {label['policy']['dropped']}" in capsys.readouterr().out

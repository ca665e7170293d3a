"""``finitetune explain``, and attribution through the main job (`finitetune train`)."""

from __future__ import annotations

import json

import pytest

from finitetune.cli.main import main


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_main_job_names_the_poisoned_sample_by_source_line_and_explain_shows_it(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    """One training example contains a character whose byte tokens occur nowhere else, and
    their embeddings come out NaN (a hook on the embedding: the tiny model ties its input and
    output embeddings, so NaN weight rows would poison every logit): the event of that step
    names the example's dataset index and ``file:line``; ``finitetune explain`` prints it."""
    import finitetune.models as models
    from finitetune.builtin.tasks import tiny_task
    from finitetune.train.recipe import split_records

    records = [{"prompt": r["prompt"], "response": r["response"]} for r in tiny_task(40, seed=7)]
    train, _ = split_records([{"at": i} for i in range(40)], 8, 0)
    position = [t["at"] for t in train].index(train[5]["at"])  # index among training rows
    line = train[5]["at"] + 1
    records[line - 1]["prompt"] = records[line - 1]["prompt"].replace("Words:", "Words: \u03a9")
    data = _write_jsonl(tmp_path / "d.jsonl", records)

    tok = models.load_tokenizer(tiny_model_dir)
    tokens = [set(tok(r["prompt"] + r["response"])["input_ids"]) for r in records]
    poison = sorted(tokens[line - 1] - set().union(*(t for i, t in enumerate(tokens)
                                                     if i != line - 1)))
    assert poison  # the byte tokens of the character are unique to that example
    load = models.load_model

    def poisoned(*a, **k):
        import torch

        def nan_rows(module, args, out):
            hit = torch.isin(args[0], torch.tensor(poison)).any(-1)
            return out.masked_fill(hit[:, None, None], float("nan"))

        model = load(*a, **k)
        model.get_input_embeddings().register_forward_hook(nan_rows)
        return model

    monkeypatch.setattr(models, "load_model", poisoned)
    out = tmp_path / "run"
    code = main(["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir",
                 str(out), "--max-steps", "4", "--batch-size", "8", "--eval-size", "8",
                 "--lora-r", "0", "--logging-steps", "1", "--no-eval-before"])
    assert code == 0
    (ev,) = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    where = f"{data}:{line}"
    assert ev["action"] == "skip" and ev["verdict"] == "data_or_model"
    assert position in ev["sample_ids"] and len(ev["sample_ids"]) == 8
    assert ev["sources"][ev["sample_ids"].index(position)] == where
    assert [(s["index"], s["source"]) for s in ev["bad_samples"]] == [(position, where)]
    assert ev["first_nonfinite_module"] == "model.embed_tokens"
    assert (out / ev["batch_file"]).is_file()
    capsys.readouterr()

    assert main(["explain", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"step {ev['step']}: skip ({ev['reason']})" in text
    assert "first non-finite module: model.embed_tokens" in text
    assert "verdict: data_or_model: sample" in text and f"{position} ({where}) <- non-finite" in text
    assert f"batch: {out / ev['batch_file']}" in text

    assert main(["explain", str(out), "--json"]) == 0
    (again,) = json.loads(capsys.readouterr().out)
    assert again["bad_samples"] == ev["bad_samples"]


def test_explain_reads_events_without_attribution_and_nonfinite_numbers(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _write_jsonl(run / "events.jsonl", [
        {"step": 3, "kind": "guard", "action": "skip", "reason": "nonfinite_loss",
         "grad_norm": None, "grad_norm_nonfinite": "nan", "loss": None, "loss_nonfinite": "inf"},
        {"step": 9, "kind": "guard", "action": "halt", "reason": "nonfinite_grad",
         "grad_norm": 2.5, "loss": 1.25, "nonfinite_params": [f"p{i}" for i in range(7)],
         "nonfinite_param_count": 7},
    ])
    assert main(["explain", str(run / "events.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "2 guard events (1 skip, 1 halt)" in text
    assert "step 3: skip (nonfinite_loss)  grad_norm nan  loss inf" in text
    assert "step 9: halt (nonfinite_grad)  grad_norm 2.5  loss 1.25" in text
    assert "non-finite gradients: 7 parameters: p0, p1, p2, p3, p4 (+2 more)" in text


@pytest.mark.parametrize("case", ["missing", "not_a_run", "bad_json"])
def test_explain_exits_2_on_unusable_input(tmp_path, capsys, case):
    target = tmp_path / "run"
    if case != "missing":
        target.mkdir()
    if case == "bad_json":
        (target / "events.jsonl").write_text('{"step": 1}\n{"step": 2, \n')
    assert main(["explain", str(target)]) == 2
    err = capsys.readouterr().err
    assert {"missing": "does not exist", "not_a_run": "not a finitetune run directory",
            "bad_json": "events.jsonl:2: not valid JSON"}[case] in err


def test_explain_a_clean_run_says_so(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("model: tiny\n")
    assert main(["explain", str(tmp_path)]) == 0
    assert "no guard events: every optimizer step was applied" in capsys.readouterr().out

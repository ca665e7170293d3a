"""Input crafted to break the reader instead of the report: nesting bombs and escape sequences.

A JSON line nested 100,000 levels deep (in a log, a data row, ``events.jsonl``, a settings
file) must be a named error with the file and line and exit 2 where the reader is strict, a
note where it is tolerant, and never a ``RecursionError`` (whose exit 1 would mean
"unhealthy"). Escape sequences in anything a log or a run directory carries (metric names,
event fields, file names, error messages) must never reach the terminal.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from finitetune.cli.main import main
from finitetune.parsing import MAX_NESTING, json_loads, printable

BOMB = "[" * 100_000 + "]" * 100_000
SRC = Path(__file__).resolve().parent.parent / "src" / "finitetune"


def _entry(i: int, loss: float | None = None) -> str:
    return json.dumps({"step": i, "loss": 2.0 - 0.02 * i if loss is None else loss,
                       "grad_norm": 1.0, "learning_rate": 1e-4})


# ---------------------------------------------------------------------------- the bound --
@pytest.mark.parametrize("text,deep", [
    ("[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1), True),
    ("[" * MAX_NESTING + "]" * MAX_NESTING, False),
    ('["]",' * 200 + "1" + "]" * 200, True),        # a ']' inside a string closes nothing
    ('["\\"]",' * 200 + "1" + "]" * 200, True),     # nor after an escaped quote
    ('{"m": "' + "[" * 5000 + '"}', False),          # brackets inside a string do not nest
    ("[" * 100_000, True),                            # cut off: never closed
    (json.dumps([[1, 2]] * 5000), False),             # many brackets, shallow
])
def test_the_depth_bound_counts_only_real_nesting(text, deep):
    from finitetune.errors import NestingError

    for form in (text, text.encode()):
        if deep:
            with pytest.raises(NestingError, match=r"where:7: JSON nested deeper than 100"):
                json_loads(form, "where:7")
        else:
            try:
                expected = json.loads(text)
            except ValueError:  # not JSON at all (cut off): the parser's own error, not ours
                with pytest.raises(ValueError) as err:
                    json_loads(form, "where:7")
                assert not isinstance(err.value, NestingError), "a shallow document was refused"
            else:
                assert json_loads(form, "where:7") == expected


def test_every_json_and_yaml_parse_in_the_package_is_bounded():
    """The class, not the examples: every call of ``json.loads``/``json.load``, of a
    ``JSONDecoder`` or of PyYAML's loaders in ``src/finitetune`` sits in a function that
    bounds the nesting first (or in the one module that does it for everyone)."""
    parsers = {"loads", "load", "safe_load", "compose", "full_load", "unsafe_load",
               "raw_decode", "decode"}
    bounded = {"check_json", "check_yaml", "json_loads"}
    unguarded = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "parsing":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)
                     and isinstance(n.func, ast.Attribute)]
            names = {getattr(c.func, "id", None) or getattr(c.func, "attr", None)
                     for c in ast.walk(fn) if isinstance(c, ast.Call)}
            for call in calls:
                owner = call.func.value
                owner_name = getattr(owner, "id", None) or getattr(owner, "attr", "")
                if call.func.attr in parsers and (
                        owner_name in ("json", "yaml") or "DECODER" in str(owner_name)) \
                        and not names & bounded:
                    unguarded.append(f"{path.relative_to(SRC)}:{call.lineno}")
    assert not unguarded, unguarded


# ------------------------------------------------------------------- each reader, case 8 --
def test_report_of_a_log_with_a_nested_line_names_it_and_exits_2(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text(_entry(1) + "\n" + BOMB + "\n" + _entry(2) + "\n")
    assert main(["report", str(log)]) == 2
    err = capsys.readouterr().err
    assert f"{log}, line 2: JSON nested deeper than {MAX_NESTING} levels" in err
    assert "Traceback" not in err and "RecursionError" not in err


@pytest.mark.parametrize("shape", ["trainer_state", "fragment", "pasted"])
def test_report_of_a_nested_document_exits_2(tmp_path, capsys, monkeypatch, shape):
    import io
    import sys

    deep = "[" * 100_000 + "]" * 100_000
    if shape == "trainer_state":
        path = tmp_path / "trainer_state.json"
        path.write_text('{"log_history": [{"loss": 1.0, "step": 1, "x": ' + deep + "}]}")
        args = ["report", str(path)]
    elif shape == "fragment":  # cut off: goes to the salvage reader
        path = tmp_path / "cut.json"
        path.write_text('{"log_history": [\n  {"loss": 1.0, "step": 1},\n  {"loss": ' + deep)
        args = ["report", str(path)]
    else:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(
            ('  "loss": 1.0,\n  "step": 2,\n{"loss": ' + deep + "}\n").encode())))
        args = ["report", "-"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"nested deeper than {MAX_NESTING} levels" in err and "Traceback" not in err


def test_a_run_directory_with_nested_lines_is_reported_with_notes(tmp_path, capsys):
    """The report of a run directory is tolerant (a dead run's report matters most): a nested
    line of metrics.jsonl or events.jsonl, a nested status.json or config.yaml are notes."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(_entry(i) + "\n" for i in range(1, 31))
                                       + BOMB + "\n" + _entry(31) + "\n")
    (run / "events.jsonl").write_text(BOMB + "\n")
    (run / "status.json").write_text(BOMB)
    (run / "config.yaml").write_text("guard: " + "[" * 100_000 + "\n")
    code = main(["report", str(run)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"metrics.jsonl, line 31: nested deeper than {MAX_NESTING} levels, skipped" in out
    assert f"events.jsonl, line 1: nested deeper than {MAX_NESTING} levels, skipped" in out
    assert "status.json: ignored" in out and "config.yaml unreadable" in out


def test_check_names_the_nested_data_row(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": '
                    + BOMB + "}\n")
    assert main(["check", "--data", str(data), "--model", tiny_model_dir]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: JSON nested deeper than {MAX_NESTING} levels" in err


def test_train_refuses_a_nested_data_row_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n' + BOMB + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir",
                 str(out)]) == 2
    assert f"{data}:2: JSON nested deeper" in capsys.readouterr().err
    assert not out.exists()


def test_explain_names_the_nested_event_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_text(json.dumps({"step": 3, "action": "skip"}) + "\n"
                                      + BOMB + "\n")
    (run / "metrics.jsonl").write_text(_entry(1) + "\n")
    assert main(["explain", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"events.jsonl:2: JSON nested deeper than {MAX_NESTING} levels" in err


@pytest.mark.parametrize("verb", ["train", "run"])
def test_a_nested_settings_file_is_named_with_its_line(tmp_path, capsys, verb):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.1\nguard:\n  policy: " + "[" * 100_000 + "\n")
    argv = (["train", "--config", str(cfg), "--output-dir", str(tmp_path / "r")]
            if verb == "train" else ["run", "--config", str(cfg), "--", "true"])
    assert main(argv) == 2
    assert f"{cfg}:3: YAML nested deeper than {MAX_NESTING} levels" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_watch_skips_a_nested_line_with_a_note(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(_entry(i) + "\n" for i in range(1, 21)) + BOMB + "\n")
    code = main(["watch", str(log), "--plain", "--idle-exit", "0.5", "--interval", "0.05"])
    out = capsys.readouterr()
    assert code in (0, 1) and "Traceback" not in out.err
    from finitetune.report.follow import Follower

    follower = Follower(log)
    try:
        follower.poll()
        assert any(f"nested deeper than {MAX_NESTING}" in n for n in follower.log.notes)
        assert len(follower.log.records) == 20
    finally:
        follower.close()


# ---------------------------------------------------------------------- escapes, case 9 --
ESC = "\x1b[31m"
OSC = "\x1b]0;pwned\x07"


def test_printable_removes_escapes_and_controls_but_keeps_the_text():
    assert printable(f"a{ESC}red\x1b[0m b{OSC}c\rd\u202ee\tf\n\x07") == "ared bcde\tf\n"
    plain = "loss 2.0 → 1.5 (steps 1–10)\n"
    assert printable(plain) is plain


def _no_escapes(text: str) -> bool:
    return not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", text)


def test_report_strips_escapes_from_metric_names_and_values(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({
        "step": i, "loss": 2.0 - 0.05 * i, "grad_norm": 1.0,
        f"{ESC}eval_accuracy{OSC}": 0.5 + 0.01 * i, f"guard/{ESC}skipped": 0,
        "eval_loss": 1.0}) + "\n" for i in range(1, 21)))
    for fmt in ("md", "html", "json"):
        main(["report", str(log), "--format", fmt])
        out = capsys.readouterr().out
        assert "eval_accuracy" in out, fmt  # the name is shown, without the escapes
        assert _no_escapes(out), (fmt, [c for c in out if ord(c) < 32 and c not in "\n\t"])


def test_explain_watch_and_errors_strip_escapes(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(_entry(i) + "\n" for i in range(1, 12)))
    (run / "events.jsonl").write_text(json.dumps({
        "step": 3, "action": f"skip{ESC}", "reason": f"nonfinite_grad{OSC}",
        "verdict": f"data{ESC}", "suggestion": "\x1b[2Jcleared", "sample_ids": [1],
        "sources": [f"d.jsonl:2{ESC}"]}) + "\n")
    assert main(["explain", str(run)]) == 0
    out = capsys.readouterr().out
    assert "nonfinite_grad" in out and "cleared" in out and _no_escapes(out)
    main(["watch", str(run), "--plain", "--idle-exit", "0.3", "--interval", "0.05"])
    assert _no_escapes(capsys.readouterr().out)
    bad = tmp_path / f"no{ESC}such{OSC}.log"
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "nosuch.log" in err and _no_escapes(err)


def test_the_command_line_strips_escapes_from_finitetune_s_warnings(tmp_path, caplog):
    """Warnings name the user's files and samples (a resume's notes, moved samples)."""
    import logging

    main(["report", str(tmp_path / "nothing.log")])  # any command installs the filter
    caplog.set_level("WARNING", logger="finitetune")
    logging.getLogger("finitetune").warning("finitetune: resume: %s", f"d{ESC}.jsonl{OSC}:3")
    assert "d.jsonl:3" in caplog.text and _no_escapes(caplog.text)

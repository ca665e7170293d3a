"""Health report outputs: Markdown like the hand-written seed report, strict JSON, and one
self-contained HTML file whose plots are embedded and whose user text is escaped."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from finitetune import health_report
from finitetune.cli.main import main
from finitetune.report import report_dict, to_json, to_markdown, write_reports
from finitetune.rundir.jsonio import append_jsonl, write_json_atomic

LOGS = Path(__file__).parent / "data" / "logs"
AFTER, BEFORE = str(LOGS / "seed_after.log"), str(LOGS / "seed_before.log")
EVIL = '<script>alert("x")</script>'


def _strict_json(text: str):
    def refuse(token):
        raise AssertionError(f"bare {token} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_markdown_has_the_seed_report_sections_and_numbers(capsys):
    assert main(["report", AFTER]) == 0
    md = capsys.readouterr().out
    for heading in ("## Summary", "## Gradient norms", "## Loss values", "## Conclusion"):
        assert heading in md
    grad = md[md.index("## Gradient norms"):md.index("## Loss values")]
    for row in ("| Total entries | 2 |", "| Valid (finite) | 2 |", "| NaN | 0 |", "| Zero | 0 |",
                "| Range | 1.5671–1.6627 |", "| Mean | 1.6149 |"):
        assert row in grad
    loss = md[md.index("## Loss values"):md.index("## Learning rate")]
    assert "| Range | 2.1651–2.2549 |" in loss and "| Mean | 2.2100 |" in loss
    assert "Trend: decreasing" in loss and "weak evidence" in loss
    assert "**Verdict: INCONCLUSIVE (exit code 0; 1 with --strict)" in md
    assert "## Before / after" not in md and "Model learns: not shown" in md
    assert "Inconclusive: nothing in this log shows that the model learns" in md


def test_compare_prints_the_before_after_table(capsys):
    assert main(["report", AFTER, "--compare", BEFORE]) == 0  # exit code: the PATH run
    md = capsys.readouterr().out
    table = md[md.index("## Before / after"):md.index("## Conclusion")]
    for row in ("| Verdict | unhealthy | inconclusive |", "| Grad norm entries | 3 | 2 |",
                "| Grad norm valid | 0 | 2 |", "| Grad norm NaN | 3 | 0 |",
                "| Grad norm range | n/a | 1.5671–1.6627 |", "| Loss zero | 3 | 0 |",
                "| Loss mean | 0.0000 | 2.2100 |", "| Loss trend | unknown | decreasing |"):
        assert row in table
    assert "Hidden NaN loss" in table
    assert main(["report", BEFORE, "--compare", AFTER]) == 1


def test_json_is_strict_and_keeps_what_nan_was(capsys):
    assert main(["report", AFTER, "--compare", BEFORE, "--format", "json"]) == 0
    data = _strict_json(capsys.readouterr().out)
    assert data["verdict"] == "inconclusive" and data["exit_code"] == 0
    assert data["metrics"]["grad_norm"]["mean"] == pytest.approx(1.6149, abs=5e-5)
    before = data["before"]
    assert before["verdict"] == "unhealthy" and before["findings"][0]["rule"] == "hidden_nan_loss"
    assert before["metrics"]["grad_norm"]["samples"][0] == {
        "step": 1, "value": None, "value_nonfinite": "nan"}
    assert before["reasons"] == [before["findings"][0]["title"]]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _hostile_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for i in range(1, 7):
        nan = i >= 4
        append_jsonl(run / "metrics.jsonl", {"step": i, "loss": 0.0 if nan else 2.5 - i / 10,
                                             "grad_norm": float("nan") if nan else 1.2,
                                             "learning_rate": 1e-3, "skipped": nan})
    append_jsonl(run / "events.jsonl", {"step": 6, "kind": "halt", "reason": EVIL})
    write_json_atomic(run / "label_report.json", {"<img src=x onerror=alert(1)>": 3})
    return run


def test_html_embeds_the_plots_and_escapes_user_text(tmp_path):
    run = _hostile_run(tmp_path)
    out = tmp_path / "report.html"
    assert main(["report", str(run), "--compare", AFTER, "--format", "html", "-o", str(out)]) == 1
    page = out.read_text()
    parser = _Tags()
    parser.feed(page)
    names = [t for t, _ in parser.tags]
    assert "script" not in names
    images = [a["src"] for t, a in parser.tags if t == "img"]
    assert len(images) == 3  # loss, grad norm, learning rate
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = "".join(parser.text)
    assert EVIL in text and "<img src=x onerror=alert(1)>: 3" in text  # shown, as text
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched


def test_write_reports_leaves_all_three_files_for_a_halted_run(tmp_path):
    run = _hostile_run(tmp_path)
    report = write_reports(run)
    assert report.verdict == "unhealthy"
    rules = {f.rule for f in report.findings}
    assert {"guard_halt", "hidden_nan_loss"} <= rules
    data = _strict_json((run / "report.json").read_text())
    assert data["verdict"] == "unhealthy" and data["guard"]["skipped_entries"] == 3
    md = (run / "report.md").read_text()
    assert "&lt;script>" in md and EVIL not in md  # markdown viewers render raw HTML
    assert (run / "report.html").read_text().count("data:image/png;base64,") == 3


def test_write_reports_on_an_empty_run_directory(tmp_path):
    report = write_reports(tmp_path)
    assert report.verdict == "warning" and [f.rule for f in report.findings] == ["no_steps"]
    assert all((tmp_path / f"report.{ext}").is_file() for ext in ("md", "json", "html"))


def test_report_object_api():
    r = health_report(BEFORE, compare=AFTER)
    assert r.exit_code() == 1 and r.before is not None and r.before.exit_code() == 0
    assert report_dict(r)["before"]["verdict"] == "inconclusive"
    assert _strict_json(to_json(r))["metrics"]["loss"]["zero"] == 3
    assert to_markdown(r).startswith("# Training health report")

"""Real logs from public issue threads (tests/data/real_logs, manifest.json): the report gives
the expected verdict on every one, and names the cause where the thread states one.

The fixtures hold only the log lines people pasted (no prose); each manifest entry has the
thread's address, the verdict the lines show, the findings that must be there, and, where the
thread states a cause, the finding whose wording names it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finitetune.cli.main import main
from finitetune.report import health_report, to_markdown

REAL = Path(__file__).parent / "data" / "real_logs"
MANIFEST = json.loads((REAL / "manifest.json").read_text())["logs"]
CAUSE_WORDS = {  # what the finding that names the thread's cause must say
    "loss_scale_calibration": "fp16 loss-scale calibration",
    "loss_scale_zero": "fp16 loss scale is 0",
    "zero_lr": "Learning rate is 0.0",
    "eval_nonfinite": "eval_loss is NaN/inf",
    "events": "loss_scale_skip",
}


def test_the_set_is_real_and_large_enough():
    assert len(MANIFEST) >= 20
    files = {p.name for p in REAL.iterdir()} - {"manifest.json"}
    assert files == {e["file"] for e in MANIFEST}
    for e in MANIFEST:
        assert e["source"].startswith("https://github.com/") and e["expected_verdict"] in (
            "healthy", "inconclusive", "warning", "unhealthy")
        # a verdict that changed with the rules says why, in the manifest
        assert e["expected_verdict"] != "inconclusive" or e.get("verdict_change")
    assert len({e["source"] for e in MANIFEST}) == len(MANIFEST)  # one thread each
    assert sum(e["thread_cause"] is not None for e in MANIFEST) >= 5


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_expected_verdict_and_cause(entry, tmp_path):
    path = REAL / entry["file"]
    r = health_report(path)
    rules = {f.rule for f in r.findings}
    assert r.verdict == entry["expected_verdict"], [(f.severity, f.title) for f in r.findings]
    assert set(entry["expected_rules"]) <= rules
    if entry["cause_rule"]:
        named = [f.title for f in r.findings if f.rule == entry["cause_rule"]]
        assert named and CAUSE_WORDS[entry["cause_rule"]] in named[0]
    # the CLI agrees, and pasting the same lines on stdin gives the same verdict
    want = {"healthy": 0, "inconclusive": 0, "warning": 0, "unhealthy": 1}[
        entry["expected_verdict"]]
    assert main(["report", str(path), "-o", str(tmp_path / "r.md")]) == want
    assert health_report(path.read_text(encoding="utf-8") + "\n").verdict == r.verdict
    assert "0.0000 entries" not in to_markdown(r)

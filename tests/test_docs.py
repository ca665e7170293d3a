"""The documentation a newcomer reads stays short, current and self-contained.

The README is the five-minute path (install and the two-line diff near the top, at most 300
lines), its figures are the measured ones in ``docs/benchmarks.md``, and nothing in the
repository points at material a reader of it cannot open (issue trackers, design notes kept
elsewhere).
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
TABLE = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")


def test_readme_is_short_and_starts_with_install_and_the_diff():
    lines = README.splitlines()
    assert len(lines) <= 300
    head = "\n".join(lines[:60])
    assert "pip install finitetune" in head
    assert "+from finitetune import GuardCallback" in head and "callbacks=[GuardCallback()]" in head
    assert "make demo" in README and "make test" in README


def _table_value(area: str, measure: str) -> str:
    for line in TABLE.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[0] == area and cells[1] == measure:
            return cells[3]
    raise AssertionError(f"no row {area} / {measure} in docs/benchmarks.md")


def _paragraph(start: str) -> str:
    """The README paragraph that begins with ``start``, its lines joined by single spaces."""
    text = README[README.index(start):] + "\n\n"
    return " ".join(text[:text.index("\n\n")].split())


def _assert_figures(start: str, checks: list[tuple[str, str, str]]) -> None:
    """Each (area, measure, phrase): the phrase, with ``{}`` replaced by the table's value for
    that row as the README writes it ("93 %" for "93%"), is in the README paragraph beginning
    with ``start``."""
    paragraph = _paragraph(start)
    for area, measure, phrase in checks:
        expected = phrase.format(_table_value(area, measure).replace("%", " %"))
        assert expected in paragraph, f"README says otherwise than the table: {expected!r}"


def test_readme_demo_figures_are_the_measured_ones():
    _assert_figures("The demo (`make demo`)", [
        ("demo", "exact match after training", "**{}**"),
        ("demo", "training time / 180 s budget", "{} of its 3-minute"),
    ])


def test_readme_clipping_and_ci_figures_are_the_measured_ones():
    healthy = ("steps not applied on healthy tiny runs (partial windows, random tokens; 3 seeds; "
               "fixed and adaptive clip)")
    rescued = ("tiny, at the lowest LR multiple where (a) or (b) fails: seeds with (c) adaptive "
               ">= 90 % exact match")
    _assert_figures("**Spikes and clipping.**", [
        ("spike rules", healthy, "3 seeds: **{}**"),
        ("adaptive clipping", rescued, "90 % exact match in **{}** of 3 seeds"),
        ("adaptive clipping", "demo, at the failing multiple: seeds with (c) >= 90 %",
         "on the demo at 16x, in **{}** of 3"),
        ("adaptive clipping", "tiny, default LR: exact match, adaptive - fixed", "by **{}** (tiny)"),
        ("adaptive clipping", "demo, default LR: exact match, adaptive - fixed",
         "and **{}** (demo)"),
        ("adaptive clipping", "tiny, default LR: its extra work / median step",
         "costs **{}** of a step"),
    ])
    warm = _table_value("CI", ".ci/run on a clean clone, warm package cache (lint, suite, "
                        "version matrix)")
    cold = _table_value("CI", ".ci/run on a clean clone, cold package cache")
    ci = _paragraph("`make test` runs the suite")
    assert f"takes {warm.replace(' min', ' minutes')}" in ci
    assert f"{cold.replace(' min', '')} with a cold one" in ci


def test_the_benchmark_page_holds_the_whole_stability_grid():
    # every learning-rate multiple x every grid variant of the tiny model, and the demo's cells
    tiny = TABLE[TABLE.index("## Stability: tiny model"):]
    for mult, lr in ((1, "0.003"), (2, "0.006"), (4, "0.012"), (8, "0.024"), (16, "0.048"),
                     (32, "0.096")):
        for variant in ("(a)", "(b)", "(c)", "(d1)", "(d2)"):
            assert re.search(rf"^\| {mult}x \({lr}\) \| {re.escape(variant)} ", tiny, re.M), \
                (mult, variant)
    demo = TABLE[TABLE.index("## Stability: demo cells"):]
    for mult in ("1x (0.001)", "16x (0.016)"):
        for variant in ("(b)", "(c)"):
            assert f"| {mult} | {variant} " in demo


def test_nothing_cites_what_a_reader_cannot_open():
    pattern = re.compile(r"\bissue [0-9]|\u00a7|DESIGN\.md", re.I)
    found = []
    for base in ("src", "tests", "bench", "docs"):
        for path in (ROOT / base).rglob("*"):
            if path.suffix in {".py", ".md", ".json", ".yaml", ".txt"} and path.is_file() \
                    and path != Path(__file__):
                for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                    if pattern.search(line):
                        found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:80]}")
    found += [f"README.md: {m.group(0)}" for m in pattern.finditer(README)]
    assert not found, "\n".join(found)

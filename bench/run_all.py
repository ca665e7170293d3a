"""``make bench``: every benchmark, one after the other, then "Targets vs measured".

    python -m bench.run_all                       # all of them, ~8 min on 2 CPU cores
    python -m bench.run_all --only guard --only syncs
    python -m bench.run_all --summary-only        # rebuild the summary, run nothing

Each benchmark runs in its own subprocess (a fresh interpreter: no allocator or thread state
carried from one to the next), prints its table and appends a dated section with the machine
and versions to ``docs/benchmarks-history.md``. Each reports ratios measured within one run (median of
at least 5 repetitions), because absolute times drift by ±10 % on shared machines. Sizes are
the scripts' defaults except where noted in ``BENCHES`` (smaller inputs, same medians), so the
whole suite stays under 10 minutes on two cores.

Then ``docs/benchmarks.md`` is rewritten: one table, every target beside the newest measured
value of its kind, with the date and machine of that measurement. Targets live in ``TARGETS``
below, each with the reason for its bound.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "benchmarks.md"
HISTORY = ROOT / "docs" / "benchmarks-history.md"


@dataclass
class Bench:
    key: str
    module: str
    args: list[str]
    why: str = ""


BENCHES = [
    Bench("guard", "bench.bench_guard", []),
    Bench("syncs", "bench.bench_syncs", []),
    Bench("labels", "bench.bench_labels", ["--n", "50000"],
          "50k examples instead of 100k: the ratio is per example, the time halves"),
    Bench("loss", "bench.bench_loss", []),  # default size: the README's 0.33x is stated for it
    Bench("loss_hidden", "bench.bench_loss_hidden", []),  # vocab 128k, seq 2048
    Bench("report", "bench.bench_report", []),
    Bench("rank_check", "bench.bench_rank_check", []),
    Bench("rollback", "bench.bench_rollback", []),
    Bench("watch", "bench.bench_watch", []),
    Bench("tiny", "bench.bench_demo", ["--model", "tiny"]),
    Bench("stability", "bench.bench_stability", [],
          "the tiny grid: 6 learning rates x 3 seeds x 5 variants, ~10 min on 2 idle cores"),
    Bench("healthy", "bench.bench_stability", ["--healthy"],
          "healthy tiny runs with partial windows and random tokens, 3 seeds"),
    Bench("demo", "bench.bench_demo", []),
    Bench("demo_step", "bench.bench_demo_step", []),
]


@dataclass
class Target:
    area: str
    measure: str
    section: str
    """Title of the benchmark section (without its date) that holds the value."""
    pattern: str
    """Regex whose first group is the value, searched in the section's body."""
    op: str
    bound: float
    source: str
    unit: str = ""
    pick: Callable[[list[float]], float] = max

    def met(self, value: float) -> bool:
        return value <= self.bound if self.op == "<=" else value >= self.bound


GUARD = "Gradient guard overhead (Trainer step)"
SYNCS = "Gradient guard: host syncs per optimizer step"
LABELS = "Label validation cost"
LOSS = "causal_lm_loss vs transformers ForCausalLMLoss"
REPORT = "Health report: parse of a noisy console log"
WATCH = "finitetune watch: CPU while following a log"
DEMO = "Demo: SmolLM2-135M LoRA on BBC topics"
TINY = "Tiny model on its generated task"
LOSS_HIDDEN = "Loss from hidden states: supervised-only head vs transformers"
DEMO_STEP = "Demo training step: supervised-only LM head vs full logits"
_HIDDEN_ROW = r"\| {} \| frozen \|[^|]*\|[^|]*\|"  # supervised fraction, head, two peaks
RANK = "Cross-rank consistency check cost"
ROLLBACK = "Rollback policies: peak memory, in-memory vs on-disk"
STABILITY = "Stability: tiny model, learning rate x1 to x32"
STABILITY_DEMO = "Stability: demo cells"
HEALTHY = "Healthy runs: steps not applied"
HEALTHY_DEMO = "Healthy demo runs: steps not applied"
CI = "CI: .ci/run wall time, version matrix included"
WHOLE = (STABILITY, STABILITY_DEMO)
"""Sections the page shows in full below the table (the stability grids: every cell)."""
_COST = r"\| adaptive clipping's extra work / median step \|\s*\*\*(-?[\d.]+)%"
_DELTA = r"\| exact match, adaptive - fixed \(mean of 3 seeds\) \|\s*([+-]?[\d.]+) points"
_N90 = r"\(c\) mean [\d.]+ %, >= 90 % in (\d)/3"
_NOT_APPLIED = r"\| steps not applied, total \|\s*\*\*(\d+)\*\*"

TARGETS = [
    Target("gradient guard", "Trainer step time, guarded / unguarded", GUARD,
           r"\| step time guarded / unguarded[^|]*\|\s*\*\*([\d.]+)\*\*", "<=", 1.02,
           "a guarded step costs at most 2 % more (median of >= 5 interleaved runs; whole steps "
           "drift ±10 % under load on shared machines, so the next row is the precise figure)"),
    Target("gradient guard", "guard's own work / median step", GUARD,
           r"\| guard's own work / median guarded step \|\s*([\d.]+)%", "<=", 5.0,
           "the guard's work timed inside the step, precise where whole steps drift; 5 % budget", "%"),
    Target("gradient guard", "host syncs added per optimizer step (GA 1 and 4)", SYNCS,
           r"\| gradient accumulation \d+ \|[^|]*\|[^|]*\|\s*\*\*([\d.]+)\*\*", "<=", 1.0,
           "the guard may add at most one scalar host sync per optimizer step"),
    Target("cross-rank check", "its cost on healthy steps at the default interval / step",
           RANK, r"\| total at the default interval / step \|\s*\*\*([\d.]+)%", "<=", 1.0,
           "DDP, 2 gloo ranks, timed inside the step: the check must cost under 1 %", "%"),
    Target("spike rules", "steps not applied on healthy tiny runs (partial windows, random "
           "tokens; 3 seeds; fixed and adaptive clip)", HEALTHY, _NOT_APPLIED, "<=", 0,
           "a healthy run is exactly a transformers run: no step of ordinary variance skipped"),
    Target("spike rules", "steps not applied on healthy demo runs (preset and partial "
           "windows)", HEALTHY_DEMO, _NOT_APPLIED, "<=", 0,
           "the same on the demo (SmolLM2, LoRA)"),
    Target("adaptive clipping", "tiny, at the lowest LR multiple where (a) or (b) fails: "
           "seeds with (c) adaptive >= 90 % exact match", STABILITY, _N90, ">=", 3,
           "adaptive clipping should rescue the LR where fixed clipping fails, in 3 of 3 seeds"),
    Target("adaptive clipping", "tiny, default LR: exact match, adaptive - fixed", STABILITY,
           _DELTA, ">=", -1.0, "adaptive clipping loses no accuracy (mean of 3 seeds)",
           " points"),
    Target("adaptive clipping", "tiny, default LR: its extra work / median step", STABILITY,
           _COST, "<=", 1.0, "timed inside the step, guard work adaptive - fixed", "%"),
    Target("adaptive clipping", "demo, at the failing multiple: seeds with (c) >= 90 %",
           STABILITY_DEMO, _N90, ">=", 3, "the same on the demo (SmolLM2, LoRA)"),
    Target("adaptive clipping", "demo, default LR: exact match, adaptive - fixed",
           STABILITY_DEMO, _DELTA, ">=", -1.0, "no accuracy lost on the demo", " points"),
    Target("adaptive clipping", "demo, default LR: its extra work / median step",
           STABILITY_DEMO, _COST, "<=", 1.0, "timed inside the step", "%"),
    Target("label validation", "validation / tokenisation (list of dicts)", LABELS,
           r"\| validate \(list of dicts\) / tokenise \|\s*([\d.]+)", "<=", 0.10,
           "a small fraction of the tokenisation the user pays anyway"),
    Target("label validation", "validation / tokenisation (datasets.Dataset)", LABELS,
           r"\| validate \(datasets\.Dataset\) / tokenise \|\s*([\d.]+)", "<=", 0.10,
           "a small fraction of the tokenisation the user pays anyway"),
    Target("safe loss", "peak memory, chunked / transformers' loss", LOSS,
           r"\| finitetune chunk \d+ \|[^|]*\|\s*([\d.]+)x", "<=", 0.5,
           "chunking exists to cut peak memory (vocab 128k, sequence 2048, batch 1, CPU)", "x"),
    Target("safe loss", "peak memory, unchunked / transformers' loss", LOSS,
           r"\| finitetune \|[^|]*\|\s*([\d.]+)x", "<=", 1.0,
           "equal values, never more memory than transformers", "x"),
    Target("safe loss", "time, chunked / transformers' loss", LOSS,
           r"\| finitetune chunk \d+ \|[^|]*\|[^|]*\|[^|]*\|\s*([\d.]+)x", "<=", 1.25,
           "chunking may cost at most 25 % more time", "x"),
    Target("safe loss", "peak memory from hidden states, 10 % supervised / transformers'",
           LOSS_HIDDEN, _HIDDEN_ROW.format("10%") + r"\s*([\d.]+)x", "<=", 0.10,
           "vocab 128k, sequence 2048, frozen head", "x"),
    Target("safe loss", "peak memory from hidden states, 100 % supervised / transformers'",
           LOSS_HIDDEN, _HIDDEN_ROW.format("100%") + r"\s*([\d.]+)x", "<=", 0.5,
           "vocab 128k, sequence 2048, frozen head", "x"),
    Target("safe loss", "time from hidden states, 10 % supervised / transformers'",
           LOSS_HIDDEN, _HIDDEN_ROW.format("10%") + r"[^|]*\|[^|]*\|[^|]*\|\s*([\d.]+)x", "<=",
           0.5, "vocab 128k, sequence 2048, frozen head", "x"),
    Target("safe loss", "demo training step, head at supervised positions / full logits",
           DEMO_STEP, r"\| demo step time, new / old[^|]*\|\s*\*\*([\d.]+)\*\*", "<=", 0.80,
           "the supervised-only head was to cut the demo's step by 20 %"),
    Target("safe loss", "demo forward + backward with no head at all / full logits (the floor)",
           DEMO_STEP, r"\| floor / old[^|]*\|\s*\*\*([\d.]+)\*\*", "<=", 0.80,
           "what any loss can reach here: while this row is not met, the row above cannot be"),
    Target("health report", "parse + statistics of 1,000,000 log lines", REPORT,
           r"\| health_report\(path\)[^|]*\|\s*([\d.]+)", "<=", 5.0,
           "a million-line log reported in under 5 s", " s"),
    Target("rollback", "extra peak memory, on-disk / in-memory rollback", ROLLBACK,
           r"in-memory policy: \*\*([\d.]+)\*\*", "<=", 0.25,
           "the disk policy keeps no copy of the state; 0.25 chosen as the bound"),
    Target("watch", "CPU of one core, following 10,000 lines/s", WATCH,
           r"Worst case: ([\d.]+) % of one core", "<=", 20.0, "following a busy log must stay cheap", "%"),
    Target("demo", "exact match after training", DEMO,
           r"\| exact match after training \|\s*([\d.]+)%", ">=", 90.0,
           "the demo teaches the task", "%"),
    Target("demo", "training time / 180 s budget", DEMO,
           r"\| training time / 180 s budget \|\s*([\d.]+)", "<=", 1.0,
           "three minutes on 2 CPU cores"),
    Target("CI", ".ci/run on a clean clone, warm package cache (lint, suite, version matrix)",
           CI, r"\| \.ci/run, warm package cache \|[^|]*\|\s*\*\*([\d.]+) min", "<=", 45.0,
           "CI on the 2-core machine stays under 45 minutes, the version matrix included", " min"),
    Target("CI", ".ci/run on a clean clone, cold package cache", CI,
           r"\| \.ci/run, cold package cache \|[^|]*\|\s*\*\*([\d.]+) min", "<=", 45.0,
           "the same with uv's package cache empty (every wheel downloaded)", " min"),
    Target("tiny model", "exact match after training", TINY,
           r"\| exact match after training \|\s*([\d.]+)%", ">=", 90.0,
           "the tiny model learns its task", "%"),
    Target("tiny model", "training time / 30 s budget", TINY,
           r"\| training time / 30 s budget \|\s*([\d.]+)", "<=", 1.0,
           "seconds, so the tests can train it"),
]


# --------------------------------------------------------------------------- parsing


def split_sections(text: str) -> list[tuple[str, str, str]]:
    """(title, date, body) of each appended section of the history, in file order."""
    out = []
    for chunk in re.split(r"^## ", text, flags=re.M)[1:]:
        head, _, body = chunk.partition("\n")
        m = re.match(r"(.*) \((\d{4}-\d\d-\d\d [\d:]+ ?\S*)\)\s*$", head.strip())
        title, date = (m.group(1), m.group(2)) if m else (head.strip(), "")
        out.append((title, date, body))
    return out


def latest(sections: list[tuple[str, str, str]]) -> dict[str, tuple[str, str]]:
    """Title -> (date, body) of the newest section with that title (the last one appended)."""
    return {title: (date, body) for title, date, body in sections}


def machine_of(body: str) -> str:
    """The CPU and its count from a section's ``Machine:`` line (what the ratio was measured on)."""
    m = re.search(r"^Machine: ([^;]*?), (\d+ CPUs)", body, flags=re.M)
    if not m:
        return "-"
    cpu = re.sub(r"\(R\)|\(TM\)|CPU|Processor", "", m.group(1))
    return f"{' '.join(cpu.split())}, {m.group(2)}"


def page_markdown(history: str, last_run: str | None = None) -> str:
    """The whole of ``docs/benchmarks.md``: one current table, built from the history."""
    newest = latest(split_sections(history))
    rows = []
    for t in TARGETS:
        date, body = newest.get(t.section, ("", ""))
        values = [float(v) for v in re.findall(t.pattern, body)]
        if values:
            value = t.pick(values)
            measured = f"{value:g}{t.unit}"
            met = "yes" if t.met(value) else "**no**"
            machine = machine_of(body)
        else:
            measured, met, date, machine = "not measured yet", "-", "-", "-"
        bound = f"{t.op} {t.bound:g}{t.unit}".replace("<=", "≤").replace(">=", "≥")
        rows.append(f"| {t.area} | {t.measure} | {bound} | {measured} | {met} | {t.source} "
                    f"| {date} | {machine} |")
    lines = [
        "# Benchmarks",
        "",
        "Every target beside its newest measurement. Written by `make bench` "
        "(`python -m bench.run_all`); each figure is a ratio measured within one run (shared "
        "machines drift by ±10 % between runs). Every run's full tables, machine and versions "
        "are in [benchmarks-history.md](benchmarks-history.md); the targets and their "
        "reasons are in `bench/run_all.py`. Below the table: the newest stability grids, every "
        "cell.",
        "",
        "| area | measure | target | measured | met | why this bound | measured on | machine |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if last_run:
        lines += ["", last_run]
    for title in WHOLE:  # tables that a row cannot summarise: shown whole, newest run
        if title in newest:
            date, body = newest[title]
            lines += ["", f"## {title} ({date})", "", body.strip()]
    return "\n".join(lines) + "\n"


def write_summary(last_run: str | None = None) -> str:
    """Rewrite ``docs/benchmarks.md`` from the history, under the lock ``append_result`` takes
    on the history file (so a benchmark appending meanwhile is not half read)."""
    HISTORY.parent.mkdir(parents=True, exist_ok=True)
    HISTORY.touch()
    with open(HISTORY, encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        history = fh.read()
        fcntl.flock(fh, fcntl.LOCK_UN)
    if last_run is None and RESULTS.exists():  # keep the previous run line
        m = re.search(r"^Last full run: .*$", RESULTS.read_text(encoding="utf-8"), flags=re.M)
        last_run = m.group(0) if m else None
    page = page_markdown(history, last_run)
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, RESULTS)
    return page


# --------------------------------------------------------------------------- running


def run_one(bench: Bench) -> tuple[int, float]:
    cmd = [sys.executable, "-m", bench.module, *bench.args]
    print(f"\n=== {bench.key}: {' '.join(cmd[1:])}" + (f"  ({bench.why})" if bench.why else ""),
          flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
    return code, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=[b.key for b in BENCHES],
                   help="run only this benchmark (repeatable)")
    p.add_argument("--summary-only", action="store_true",
                   help="rebuild docs/benchmarks.md from docs/benchmarks-history.md")
    args = p.parse_args(argv)
    if args.summary_only:
        print(write_summary())
        return 0
    chosen = [b for b in BENCHES if not args.only or b.key in args.only]
    start = time.perf_counter()
    results = {b.key: run_one(b) for b in chosen}
    total = time.perf_counter() - start
    failed = [k for k, (code, _) in results.items() if code != 0]
    last_run = None
    if not args.only:
        stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        parts = ", ".join(f"{k} {s:.0f} s" + (" (FAILED)" if c else "")
                          for k, (c, s) in results.items())
        last_run = f"Last full run: {stamp}, {total / 60:.1f} min ({parts})."
    print("\n" + write_summary(last_run))
    print(f"bench: {len(chosen) - len(failed)}/{len(chosen)} benchmarks ran in "
          f"{total / 60:.1f} min" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

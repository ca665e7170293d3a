"""CPU cost of `finitetune watch` following a log that grows by 10,000 lines per second.

    python -m bench.bench_watch                     # 20 s per variant, appends to docs
    python -m bench.bench_watch --seconds 5 --no-append

A writer process appends lines at a fixed rate (100 lines every 10 ms) to a fresh file; the
watcher (the real CLI, ``finitetune watch FILE --plain --exit-on unhealthy``) follows it in its
own process. Its CPU time is sampled (psutil) when writing starts and when it stops, so start-up
imports are not counted: CPU % = CPU seconds / wall seconds of the writing phase, of one core.
Then three hidden-NaN lines are appended and the time until the watcher exits 1 is measured:
it shows the watcher kept up with the file rather than falling behind.

Variants: the Trainer's printed dicts (every line an entry, the worst case for parsing) and
finitetune's own ``metrics.jsonl``. Baseline, measured in the same run with the same writer: a
loop that only reads the new bytes and splits them into lines (the least any follower pays).
Target: the watcher uses less than 20 % of one core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_PCT = 20.0
RATE = 10_000
BATCH = 100
BASELINE = r"""
import os, sys, time
path, idle = sys.argv[1], float(sys.argv[2])
while not os.path.exists(path):
    time.sleep(0.01)
fh, partial, last, n = open(path, "rb"), b"", time.monotonic(), 0
while True:
    data = fh.read()
    if data:
        *lines, partial = (partial + data).split(b"\n")
        n += len(lines)
        last = time.monotonic()
        if any(b"nan" in ln for ln in lines[-3:]):
            sys.exit(1)
    elif time.monotonic() - last > idle:
        break
    time.sleep(0.2)
"""


def _lines(kind: str, start: int, n: int) -> str:
    out = []
    for i in range(start, start + n):
        loss = 2.5 * math.exp(-i / 200_000) + 0.01 * ((i * 7919) % 13) / 13
        g = 1.0 + 0.1 * ((i * 104729) % 17) / 17
        if kind == "console":
            out.append(str({"loss": round(loss, 4), "grad_norm": round(g, 4),
                            "learning_rate": 2e-05, "epoch": round(i / 1e6, 4)}))
        else:
            out.append(json.dumps({"step": i + 1, "loss": loss, "grad_norm": g,
                                   "learning_rate": 2e-05, "epoch": i / 1e6, "skipped": 0}))
    return "\n".join(out) + "\n"


def _bad_lines(kind: str, start: int) -> str:
    if kind == "console":
        return "".join(str({"loss": 0.0, "grad_norm": math.nan, "learning_rate": 2e-05,
                            "epoch": 0.9}) + "\n" for _ in range(3))
    return "".join(json.dumps({"step": start + k + 1, "loss": 0.0, "grad_norm": None,
                               "grad_norm_nonfinite": "nan"}) + "\n" for k in range(3))


def run_variant(kind: str, seconds: float, follower: list[str], tmp: Path) -> dict[str, float]:
    """Write ``seconds`` x 10,000 lines while ``follower`` follows them; CPU and latency."""
    import psutil

    target = tmp / kind / ("metrics.jsonl" if kind == "jsonl" else "train.log")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(_lines(kind, 0, BATCH))  # something to detect the format from
    watched = str(target.parent if kind == "jsonl" else target)
    proc = subprocess.Popen([*follower, watched], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    time.sleep(3.0)  # imports done, first look taken
    cpu0, t0 = sum(ps.cpu_times()[:2]), time.monotonic()
    written = BATCH
    with open(target, "a", encoding="utf-8") as fh:
        while (now := time.monotonic()) - t0 < seconds:
            due = int((now - t0) * RATE)
            while written < due + BATCH:
                fh.write(_lines(kind, written, BATCH))
                written += BATCH
            fh.flush()
            time.sleep(BATCH / RATE)
        cpu1, t1 = sum(ps.cpu_times()[:2]), time.monotonic()
        fh.write(_bad_lines(kind, written))
        fh.flush()
        t_bad = time.monotonic()
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = -1
    return {"cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0), "lines": written,
            "rate": written / (t1 - t0), "exit_s": time.monotonic() - t_bad, "code": code}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    from bench.common import append_result

    watch = [sys.executable, "-m", "finitetune", "watch", "--plain", "--exit-on", "unhealthy",
             "--idle-exit", "30"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("console", "jsonl"):
            base = run_variant(kind, args.seconds, [sys.executable, "-c", BASELINE, "--"],
                               Path(tmp) / "base")
            got = run_variant(kind, args.seconds, [*watch], Path(tmp) / "watch")
            assert got["code"] == 1, f"watch did not turn unhealthy ({kind}): {got}"
            rows.append(
                f"| {kind} | {got['rate']:,.0f} | {got['lines']:,} | **{got['cpu_pct']:.1f}%** | "
                f"{base['cpu_pct']:.2f}% | {got['cpu_pct'] / max(base['cpu_pct'], 0.01):.0f}x | "
                f"{got['exit_s']:.2f} s |")
    worst = max(float(r.split("**")[1].rstrip("%")) for r in rows)
    table = (
        f"Writer: {RATE:,} lines/s ({BATCH} lines every {1000 * BATCH // RATE} ms) for "
        f"{args.seconds:.0f} s per variant; watcher: `finitetune watch FILE --plain --exit-on "
        f"unhealthy` in its own process, CPU (user+system) over the writing phase, of one core. "
        f"Target: < {TARGET_PCT:.0f} %.\n\n"
        "| log | lines/s written | lines | watch CPU | baseline CPU (read + split lines) | "
        "watch / baseline | exit after 3 hidden-NaN lines |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nWorst case: {worst:.1f} % of one core "
        f"({'meets' if worst < TARGET_PCT else 'MISSES'} the < {TARGET_PCT:.0f} % target)."
    )
    print(table)
    if not args.no_append:
        print(f"appended to {append_result('finitetune watch: CPU while following a log', table)}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

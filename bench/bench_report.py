"""Parse + statistics time of the health report on a 1,000,000-line noisy console log.

    python -m bench.bench_report                  # 1,000,000 lines, 5 reps, appends to docs
    python -m bench.bench_report --lines 100000 --reps 3 --no-append

The log is what people paste into bug reports, scaled up: the Trainer's printed dicts (quoted
``.4g`` strings and bare floats, a few ``nan``) between tqdm progress bars redrawn with carriage
returns, ANSI-coloured warnings, trailing spaces and markdown fences; one line in five is a log
dict. Timed: ``health_report(path)`` (streaming parse, statistics, trend, diagnosis; no
rendering). Baselines measured in the same run, interleaved with it: iterating over the file's
lines, and ``json.loads`` of as many short JSON dicts, so the ratio survives the drift of these
shared 2-core machines.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

TARGET_S = 5.0


def write_log(path: Path, lines: int, seed: int = 0) -> int:
    """Write ``lines`` newline-terminated lines; return how many are log dicts."""
    rng = random.Random(seed)
    dicts = 0
    loss = 2.6
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for i in range(lines):
            kind = i % 10
            if kind in (0, 5):
                dicts += 1
                loss = max(0.05, loss * 0.99999 + rng.gauss(0, 0.01))
                gn = "nan" if rng.random() < 0.01 else f"{rng.uniform(0.5, 3):.4g}"
                if kind == 0:
                    fh.write(f"{{'loss': '{loss:.4g}', 'grad_norm': '{gn}', 'learning_rate': "
                             f"'{2e-5:.4g}', 'epoch': '{i / lines:.4g}'}}  \n")
                else:
                    fh.write(f"{{'loss': {loss}, 'grad_norm': {gn}, 'learning_rate': 2e-05, "
                             f"'epoch': {i / lines}}}\n")
            elif kind in (1, 2, 3, 6, 7):
                pct = i * 100 // lines
                bars = "".join(f"\r {pct:3d}%|{'█' * (pct // 10):<10}| {i + j}/{lines} "
                               f"[00:{j:02d}<01:00,  4.2{j}it/s]" for j in range(3))
                fh.write(bars + "\n")
            elif kind == 4:
                fh.write("\x1b[33mWARNING\x1b[0m torch.utils.checkpoint: use_reentrant "
                         "should be passed explicitly\n")
            elif kind == 8:
                fh.write("```\n" if i % 1000 == 8 else "   \n")
            else:
                fh.write(f"[INFO|trainer.py:{i % 4000}] ***** Running training ***** tokens/s "
                         f"{rng.randint(900, 1100)}\n")
    return dicts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)

    from bench.common import append_result, median
    from finitetune.report.health import health_report

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "console.log"
        dicts = write_log(path, args.lines)
        size_mb = path.stat().st_size / 2**20
        json_lines = [json.dumps({"loss": 2.0 + i * 1e-6, "grad_norm": 1.5, "step": i})
                      for i in range(args.lines)]
        t_report, t_iter, t_json = [], [], []
        report = None
        for _ in range(args.reps):  # interleaved: baseline, report, baseline, ...
            t0 = time.perf_counter()
            with open(path, encoding="utf-8", errors="replace", newline="\n") as fh:
                for _line in fh:
                    pass
            t_iter.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for line in json_lines:
                json.loads(line)
            t_json.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            report = health_report(path)
            t_report.append(time.perf_counter() - t0)
    assert report is not None and report.metrics["loss"].total == dicts, "parse lost entries"
    rep, it, js = median(t_report), median(t_iter), median(t_json)
    table = (
        f"{args.lines:,} lines ({size_mb:.0f} MiB), {dicts:,} log dicts, median of {args.reps}; "
        f"target <= {TARGET_S:.0f} s.\n\n"
        "| what | seconds | ratio to line iteration | ratio to json.loads |\n|---|---|---|---|\n"
        f"| health_report(path): parse + stats + diagnosis | {rep:.2f} | {rep / it:.1f}x | "
        f"{rep / js:.2f}x |\n"
        f"| baseline: iterate the file's lines | {it:.2f} | 1.0x | {it / js:.2f}x |\n"
        f"| baseline: json.loads of {args.lines:,} short dicts | {js:.2f} | {js / it:.1f}x | "
        f"1.00x |\n\n"
        f"Verdict of the generated log: {report.verdict} "
        f"({report.metrics['grad_norm'].nan:,} NaN grad norms in {dicts:,} entries)."
    )
    print(table)
    if not args.no_append:
        print(f"appended to {append_result('Health report: parse of a noisy console log', table)}")


if __name__ == "__main__":
    main()

"""Label validation cost vs the tokenisation it follows (target: <= 10 %).

Both are timed in one process on the same 100k examples of the tiny task, with the tiny
model's locally trained tokenizer, median of 5 repetitions:
- baseline: ``tokenize_records`` (what ``finitetune train`` pays anyway),
- validation of those rows as a list of dicts and as a ``datasets.Dataset`` (Arrow path).

Run: ``python -m bench.bench_labels [--n 100000] [--reps 5] [--no-append]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _timed(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    from bench.common import median

    return median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()

    from datasets import Dataset

    from finitetune import validate_labels
    from finitetune.builtin.tasks import tiny_task
    from finitetune.data.tokenize import tokenize_records
    from finitetune.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("tiny"))
    records = tiny_task(args.n, seed=1)
    t_tok, rows = _timed(lambda: tokenize_records(records, tok, max_length=32), args.reps)
    kw = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    t_list, report = _timed(lambda: validate_labels(rows, **kw), args.reps)
    ds = Dataset.from_list(rows)
    t_ds, report_ds = _timed(lambda: validate_labels(ds, **kw), args.reps)
    assert report.to_dict() == report_ds.to_dict() and report.total == args.n
    table = (
        "| measure | value | target |\n|---|---|---|\n"
        f"| examples | {args.n:,} ({report.supervised_tokens:,} supervised tokens) | |\n"
        f"| validate (list of dicts) / tokenise | {t_list / t_tok:.3f} | <= 0.10 |\n"
        f"| validate (datasets.Dataset) / tokenise | {t_ds / t_tok:.3f} | <= 0.10 |\n"
        f"| tokenise, median of {args.reps} | {t_tok:.2f} s | |\n"
    )
    print(table)
    if not args.no_append:
        from bench.common import append_result

        append_result("Label validation cost", table)


if __name__ == "__main__":
    main()

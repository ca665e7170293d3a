"""Peak memory and time of causal_lm_loss (chunked) vs transformers' ForCausalLMLoss.

    python -m bench.bench_loss                     # vocab 128256, seq 2048, batch 1, fp32
    python -m bench.bench_loss --no-append --seq 512

Forward + backward of the loss alone, on a leaf logits tensor (what the lm_head would hand over).
Peak memory: each variant runs in a fresh subprocess; the figure is the rise of the process's
high-water RSS (``ru_maxrss``) over its resident size just before the loss, so the logits
themselves are not counted but the gradient buffer and every temporary are. (tracemalloc does
not see torch's allocations.) Time: all variants in one process, interleaved A B C A B C after a
warm-up, median of ``--reps``; reported as a ratio to transformers, since absolute times on these
shared 2-core machines drift between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("transformers", "finitetune", "finitetune_chunked")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _setup(args: argparse.Namespace):
    import torch

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    # empty + normal_: no full-size temporary, so setup does not raise the high-water mark
    logits = torch.empty(args.batch, args.seq, args.vocab, dtype=dtype).normal_()
    logits.requires_grad_(True)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels[:, : args.seq // 10] = -100  # a masked prompt, as in fine-tuning
    return logits, labels


def _loss_fn(variant: str, args: argparse.Namespace):
    from transformers.loss.loss_utils import ForCausalLMLoss

    from finitetune.loss.causal import causal_lm_loss

    if variant == "transformers":
        return lambda x, y: ForCausalLMLoss(x, y, x.shape[-1])
    if variant == "finitetune":
        return lambda x, y: causal_lm_loss(x, y)
    return lambda x, y: causal_lm_loss(x, y, chunk_size=args.chunk)


def _worker_memory(args: argparse.Namespace) -> None:
    """One forward+backward in this fresh process; print peak RSS rise as JSON."""
    import torch

    fn = _loss_fn(args.worker, args)
    # a tiny call first: lazy library/thread-pool set-up is not the loss's memory
    tiny = torch.randn(1, 8, 16, requires_grad=True)
    fn(tiny, torch.randint(0, 16, (1, 8))).backward()
    logits, labels = _setup(args)
    before_rss = _rss_bytes()
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    loss = fn(logits, labels)
    loss.backward()
    after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "peak_bytes": after_max - before_rss,
        "high_water_before_loss": before_max > after_max - 2**20,  # then the figure is a bound
        "loss": loss.item(),
        "grad_abs_sum": logits.grad.double().abs().sum().item(),
        "threads": torch.get_num_threads(),
    }))


def _time_all(args: argparse.Namespace) -> dict:
    """Interleaved timing of every variant in this process, plus a check that values agree.

    The order rotates every rep (A B C, B C A, C A B, ...): which variant runs right after a
    1 GiB gradient was freed changes its time by tens of percent on this machine.
    """
    import torch

    logits, labels = _setup(args)
    fns = {v: _loss_fn(v, args) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    values: dict[str, float] = {}
    grad_diff: dict[str, float] = {}
    ref_grad = None
    for rep in range(args.reps + 1):  # rep 0 is the warm-up (first touch of fresh pages)
        k = rep % len(VARIANTS)
        for v in VARIANTS[k:] + VARIANTS[:k]:  # rep 0 starts with transformers, the reference
            logits.grad = None
            start = time.perf_counter()
            loss = fns[v](logits, labels)
            loss.backward()
            elapsed = time.perf_counter() - start
            if rep > 0:
                times[v].append(elapsed)
                continue
            values[v] = loss.item()
            if ref_grad is None:
                ref_grad = logits.grad.clone()
            grad_diff[v] = (logits.grad.float() - ref_grad.float()).abs().max().item()
    del ref_grad
    return {
        "times": times,
        "values": values,
        "max_abs_loss_diff": {v: abs(values[v] - values["transformers"]) for v in VARIANTS},
        "max_abs_grad_diff": grad_diff,
        "threads": torch.get_num_threads(),
    }


def _spawn(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_loss", "--worker", variant,
           "--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch),
           "--chunk", str(args.chunk), "--dtype", args.dtype]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)  # Llama 3's vocabulary
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--mem-reps", type=int, default=3, help="fresh processes per variant")
    parser.add_argument("--no-append", action="store_true", help="print only")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker_memory(args)
        return

    from bench.common import append_result, median

    mem: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.mem_reps):  # interleaved, one fresh process each
        for v in VARIANTS:
            mem[v].append(_spawn(args, v))
    peak = {v: median([r["peak_bytes"] for r in mem[v]]) for v in VARIANTS}
    timing = _time_all(args)
    med = {v: median(timing["times"][v]) for v in VARIANTS}

    ref = "transformers"
    gib = 2**30
    rows = [
        f"Loss forward+backward, vocab {args.vocab}, seq {args.seq}, batch {args.batch}, "
        f"{args.dtype} logits, chunk_size {args.chunk}, torch threads {timing['threads']}. "
        f"Peak = rise of max RSS over the logits, median of {args.mem_reps} fresh processes; "
        f"time = median of {args.reps} interleaved reps (order rotated) after a warm-up.",
        "",
        "| variant | peak memory | memory vs transformers | median time | time vs transformers "
        "| loss | max abs loss diff | max abs grad diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        bound = any(r["high_water_before_loss"] for r in mem[v])
        rows.append(
            f"| {v if v != 'finitetune_chunked' else f'finitetune chunk {args.chunk}'} "
            f"| {'<= ' if bound else ''}{peak[v] / gib:.2f} GiB | {peak[v] / peak[ref]:.2f}x "
            f"| {med[v]:.2f} s | {med[v] / med[ref]:.2f}x | {timing['values'][v]:.6f} "
            f"| {timing['max_abs_loss_diff'][v]:.1e} | {timing['max_abs_grad_diff'][v]:.1e} |"
        )
    table = "\n".join(rows)
    print(table)
    if not args.no_append:
        path = append_result("causal_lm_loss vs transformers ForCausalLMLoss", table)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()

"""Peak memory and time of the loss from hidden states: transformers vs the supervised-only head.

    python -m bench.bench_loss_hidden                    # vocab 128256, seq 2048, 10 % and 100 %
    python -m bench.bench_loss_hidden --no-append --hidden 128 --reps 3

What a causal-LM training step pays after its base model, forward + backward, from the final
hidden states (a leaf tensor, as the base model would hand them over):

- **transformers**: ``lm_head(hidden)`` at every position, then ``ForCausalLMLoss`` (what the
  model computes when given labels, and what the Trainer's default path runs);
- **finitetune**: ``causal_lm_loss_from_hidden(hidden, lm_head, labels)``: the head only at
  supervised positions, in 64 MiB chunks of fp32 logits.

Supervised fraction: the last ``f`` of the sequence is supervised, the rest is a masked prompt,
as in fine-tuning. The head is frozen (LoRA fine-tuning, the demo's case); ``--trainable-head``
adds rows where it is trained (then both variants also hold its (vocab, hidden) gradient).
Peak memory: each variant in a fresh subprocess; the rise of the high-water RSS over the
resident size just before the loss (hidden states and head weight not counted, every logits
tensor, gradient and temporary counted); median of ``--mem-reps``. Time: both variants in one
process, interleaved with the order alternating, median of ``--reps`` after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("transformers", "finitetune")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _setup(args: argparse.Namespace, fraction: float, trainable: bool):
    import torch

    torch.manual_seed(0)
    hidden = torch.empty(args.batch, args.seq, args.hidden).normal_().requires_grad_(True)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    with torch.no_grad():
        head.weight.normal_(std=args.hidden ** -0.5)
    head.weight.requires_grad_(trainable)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels[:, : args.seq - round(fraction * args.seq)] = -100  # the masked prompt
    return hidden, head, labels


def _loss_fn(variant: str):
    from transformers.loss.loss_utils import ForCausalLMLoss

    from finitetune.loss.causal import causal_lm_loss_from_hidden

    if variant == "transformers":
        return lambda h, head, y: ForCausalLMLoss(head(h), y, head.out_features)
    return lambda h, head, y: causal_lm_loss_from_hidden(h, head, y)


def _worker_memory(args: argparse.Namespace) -> None:
    """One forward+backward in this fresh process; print the peak RSS rise as JSON."""
    import torch

    fn = _loss_fn(args.worker)
    tiny = torch.nn.Linear(8, 16)  # lazy library / thread-pool set-up is not the loss's memory
    fn(torch.randn(1, 8, 8, requires_grad=True), tiny, torch.randint(0, 16, (1, 8))).backward()
    hidden, head, labels = _setup(args, args.fraction, args.trainable_head)
    before_rss = _rss_bytes()
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    loss = fn(hidden, head, labels)
    loss.backward()
    after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": after_max - before_rss,
                      "high_water_before_loss": before_max > after_max - 2**20,
                      "loss": loss.item()}))


def _time(args: argparse.Namespace, fraction: float, trainable: bool) -> dict:
    """Interleaved timing of both variants (order alternating), plus value/gradient checks."""
    hidden, head, labels = _setup(args, fraction, trainable)
    fns = {v: _loss_fn(v) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    values, grads = {}, {}
    for rep in range(args.reps + 1):  # rep 0: warm-up (first touch of fresh pages), checks
        for v in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
            hidden.grad = None
            start = time.perf_counter()
            loss = fns[v](hidden, head, labels)
            loss.backward()
            elapsed = time.perf_counter() - start
            if rep:
                times[v].append(elapsed)
            else:
                values[v], grads[v] = loss.item(), hidden.grad.clone()
    grad_diff = (grads["finitetune"] - grads["transformers"]).abs().max().item()
    return {"times": times, "values": values, "grad_diff": grad_diff}


def _spawn(args: argparse.Namespace, variant: str, fraction: float, trainable: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_loss_hidden", "--worker", variant,
           "--fraction", str(fraction), "--vocab", str(args.vocab), "--seq", str(args.seq),
           "--batch", str(args.batch), "--hidden", str(args.hidden)]
    if trainable:
        cmd.append("--trainable-head")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _memory(args: argparse.Namespace, fraction: float, trainable: bool) -> dict:
    mem: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.mem_reps):  # interleaved, one fresh process each
        for v in VARIANTS:
            mem[v].append(_spawn(args, v, fraction, trainable))
    return mem


def _summary(mem: dict, timing: dict) -> dict:
    from bench.common import median

    return {
        "peak": {v: median([r["peak_bytes"] for r in mem[v]]) for v in VARIANTS},
        "bound": {v: any(r["high_water_before_loss"] for r in mem[v]) for v in VARIANTS},
        "time": {v: median(timing["times"][v]) for v in VARIANTS},
        "loss_diff": abs(timing["values"]["finitetune"] - timing["values"]["transformers"]),
        "grad_diff": timing["grad_diff"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)  # Llama 3's vocabulary
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256,
                        help="hidden size (small: the ratios hardly depend on it, the time does)")
    parser.add_argument("--fractions", default="0.1,1.0", help="supervised fractions")
    parser.add_argument("--trainable-head", action="store_true",
                        help="also measure a trained head (10 %% supervised)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--mem-reps", type=int, default=3, help="fresh processes per variant")
    parser.add_argument("--no-append", action="store_true", help="print only")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, default=0.1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker_memory(args)
        return
    import torch

    cases = [(float(f), False) for f in args.fractions.split(",")]
    if args.trainable_head:
        cases.append((cases[0][0], True))
    gib = 2**30
    rows = [
        f"Loss forward+backward from hidden states (batch {args.batch}, seq {args.seq}, hidden "
        f"{args.hidden}, vocab {args.vocab}, fp32), torch threads {torch.get_num_threads()}. "
        "transformers = `lm_head(hidden)` + `ForCausalLMLoss`; finitetune = "
        "`causal_lm_loss_from_hidden` (head only at supervised positions, 64 MiB chunks). "
        f"Peak = rise of max RSS over the inputs, median of {args.mem_reps} fresh processes; "
        f"time = median of {args.reps} interleaved reps after a warm-up.",
        "",
        "| supervised | head | transformers peak | finitetune peak | **memory ratio** "
        "| transformers time | finitetune time | **time ratio** | loss diff | grad diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    # every memory measurement first: a child process starts with its parent's high-water RSS
    # (Linux keeps ru_maxrss across fork/exec), so the parent must not have timed anything yet
    mems = [_memory(args, fraction, trainable) for fraction, trainable in cases]
    for (fraction, trainable), mem in zip(cases, mems, strict=True):
        r = _summary(mem, _time(args, fraction, trainable))
        pk, tm = r["peak"], r["time"]
        bound = "<= " if r["bound"]["finitetune"] else ""
        rows.append(
            f"| {fraction:.0%} | {'trained' if trainable else 'frozen'} "
            f"| {pk['transformers'] / gib:.2f} GiB | {bound}{pk['finitetune'] / gib:.3f} GiB "
            f"| {pk['finitetune'] / pk['transformers']:.3f}x | {tm['transformers']:.2f} s "
            f"| {tm['finitetune']:.2f} s | {tm['finitetune'] / tm['transformers']:.3f}x "
            f"| {r['loss_diff']:.1e} | {r['grad_diff']:.1e} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if not args.no_append:
        from bench.common import append_result

        path = append_result("Loss from hidden states: supervised-only head vs transformers",
                             table)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()

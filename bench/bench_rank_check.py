"""Cost of the cross-rank consistency check on healthy steps (DDP, 2 gloo processes).

    python -m bench.bench_rank_check               # 5 runs per variant, interleaved A B A B ...
    python -m bench.bench_rank_check --runs 7 --no-append

Two processes (``finitetune.testing.run_distributed``, gloo, one torch thread each) train the
same DDP Llama in a plain guarded loop (forward, backward, ``Guard.step``), with two guards over
the same model and optimizer: A has the check off (``rank_check_every=0``), B has the default
(each rank's gradient norm compared every step, a parameter checksum every
``rank_check_every`` steps). Runs alternate A B A B ..., ``--steps`` steps each; a run's step
time is the median of its steps, the figure the median over runs. Whole steps drift by ±10 %
on shared machines, so the check's own parts are also timed directly and reported as a
fraction of the median step: the per-step slots (two ``world_size`` vectors added to
the guard's one all-reduce) and the checksum pass (one ``_foreach_norm`` over the replicated
parameters), which at the default interval costs ``checksum / (interval x step)``.

Why the default interval is 50 and not smaller: the checksum reads every replicated weight
once, the step computes ~6 FLOPs per weight per token, so their ratio is about
``FLOP/s / (3 x tokens per device x bytes/s)``: small on a CPU (measured here), but on an H200
(~790 TFLOP/s bf16, ~4.3 TB/s) with 512 tokens per device it is ~12 % per checksum; every 50
steps keeps even that case near 0.25 %.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _rank_work(opts: dict) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from finitetune import Guard, GuardConfig

    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=opts["vocab"], hidden_size=opts["hidden"],
                      intermediate_size=opts["hidden"] * 3, num_hidden_layers=opts["layers"],
                      num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=opts["seq"])
    model = torch.nn.parallel.DistributedDataParallel(LlamaForCausalLM(cfg))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    # healthy steps are what is measured: spikes (the model may overfit the few batches) warn
    guards = {name: Guard(model, opt, GuardConfig(max_grad_norm=1.0, spike_action="warn",
                                                  rank_check_every=every))
              for name, every in (("A", 0), ("B", GuardConfig().rank_check_every))}
    g = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, opts["vocab"], (opts["batch"], opts["seq"]), generator=g)
               for _ in range(8)]
    medians: dict[str, list[float]] = {"A": [], "B": []}
    applied = {"A": 0, "B": 0}
    for i in range(opts["runs"] + 1):  # run 0 of each variant is a warm-up
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            times = []
            for k in range(opts["steps"]):
                batch = batches[k % len(batches)]
                t0 = time.perf_counter()
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                applied[name] += guards[name].step().applied
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
            if i:
                medians[name].append(statistics.median(times))
    # the check's own parts, timed directly (no collective inside: safe on one rank at a time)
    check = guards["B"].rank_check
    device, dtype = torch.device("cpu"), torch.float64
    grad_vec = torch.zeros(4, dtype=dtype)
    slot_t, sum_t = [], []
    for _ in range(opts["reps"]):
        t0 = time.perf_counter()
        check.slots(grad_vec, 1)  # a step without a checksum: two one-hot multiplies
        slot_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        check.checksum(device, dtype)
        sum_t.append(time.perf_counter() - t0)
    return {"medians": medians, "applied": applied, "n_params": n_params,
            "slots": statistics.median(slot_t), "checksum": statistics.median(sum_t),
            "every": check.every, "counted": sum(p.numel() for p in check.params or [])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs per variant (>= 5)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    p.add_argument("--reps", type=int, default=20, help="repetitions of the direct timings")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks-history.md")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from finitetune.testing import run_distributed

    r0, r1 = run_distributed(_rank_work, vars(args), timeout=3600)
    rows = []
    for r in (r0, r1):
        med_a, med_b = (statistics.median(r["medians"][k]) for k in ("A", "B"))
        rows.append((med_a, med_b, med_b / med_a, r["slots"] / med_b, r["checksum"] / med_b))
    ratio = statistics.fmean(x[2] for x in rows)  # both ranks did the same steps
    slots = max(x[3] for x in rows)
    checksum = max(x[4] for x in rows)
    every = r0["every"]
    per_run = ", ".join(f"{b / a:.3f}" for a, b in zip(r0["medians"]["A"], r0["medians"]["B"],
                                                       strict=True))
    assert r0["applied"] == r1["applied"], "the ranks disagree on applied steps"
    text = (
        f"DDP, 2 gloo processes x 1 torch thread, Llama {r0['n_params'] / 1e6:.1f}M params "
        f"(hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), batch "
        f"{args.batch} x {args.seq} tokens per rank, fp32, plain guarded loop; "
        f"{args.runs} runs x {args.steps} steps per variant, interleaved; the check's parts "
        f"timed directly, median of {args.reps}; fractions: the worse rank.\n\n"
        "| measure | value |\n|---|---|\n"
        f"| step time, check on / off (median of run medians, mean of the ranks) | "
        f"**{ratio:.3f}** (rank 0 {rows[0][2]:.3f}, rank 1 {rows[1][2]:.3f}) |\n"
        f"| per-run ratios (rank 0) | {per_run} |\n"
        f"| per-step slots (grad norm per rank) / median step | {slots:.4%} |\n"
        f"| checksum pass ({r0['counted'] / 1e6:.1f}M params) / median step | "
        f"{checksum:.3%} |\n"
        f"| checksum at the default interval ({every} steps) / step | "
        f"**{checksum / every:.4%}** |\n"
        f"| total at the default interval / step | **{slots + checksum / every:.4%}** |\n"
        f"| smallest interval keeping the checksum under 1 % of a step | "
        f"{max(1, math.ceil(checksum / 0.01))} |\n"
        f"| median step, check off | {rows[0][0] * 1e3:.0f} ms (for scale only) |\n"
    )
    print(text)
    if not args.no_append:
        from bench.common import append_result

        print("appended to", append_result("Cross-rank consistency check cost",
                                           text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

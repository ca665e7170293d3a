"""Cost of the gradient guard in a Trainer step: guarded vs unguarded, same model and data.

    python -m bench.bench_guard                 # 5 runs each, interleaved A B A B ...
    python -m bench.bench_guard --runs 7 --no-append

A = ``Trainer`` with its own clipping (max_grad_norm=1.0); B = the same plus
``GuardCallback()`` (which takes the clipping over). Both Trainers live in one process and are
run alternately (A B A B ...), each run ``--steps`` optimizer steps; a run's step time is the
median of its steps after the first (``on_step_begin`` -> ``on_step_end``, perf_counter), and
the figure is the median over runs. Whole-step times drift by ±10 % on these shared 2-core
machines, so the guard's own work is also timed inside the step (``Guard.work_seconds``:
``observe_loss`` on every micro-batch + the check: norm pass, sync, decision, clipping) and
reported as a fraction of the median step, next to the Trainer's own clipping that it replaces
(``_clip_grad_norm`` timed in A). Reports ratios, not absolute times. One torch thread by
default: with two, other jobs on the shared cores make OpenMP regions ~10x slower.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _build(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from bench.common import StepTimer
    from finitetune import GuardCallback

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=args.seq)
    base = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, args.vocab, (args.steps * args.batch, args.seq), generator=g)
    data = [{"input_ids": r, "labels": r} for r in rows]
    out = tempfile.mkdtemp(prefix="bench_guard_")
    trainers, timers, clip_time = {}, {}, {"s": 0.0}
    for name in ("A", "B"):
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(base.state_dict())
        timer = StepTimer()
        callbacks = [timer.callback] + ([GuardCallback()] if name == "B" else [])
        targs = TrainingArguments(
            output_dir=os.path.join(out, name), max_steps=args.steps,
            per_device_train_batch_size=args.batch, learning_rate=1e-4, max_grad_norm=1.0,
            logging_steps=10_000, save_strategy="no", report_to="none", use_cpu=True,
            disable_tqdm=True, train_sampling_strategy="sequential", seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=callbacks)
        if name == "A":  # time the Trainer's own clipping (what the guard replaces)
            original = trainer._clip_grad_norm

            def timed_clip(m, _orig=original):
                t0 = time.perf_counter()
                norm = _orig(m)
                clip_time["s"] += time.perf_counter() - t0
                return norm

            trainer._clip_grad_norm = timed_clip
        trainers[name], timers[name] = trainer, timer
    return trainers, timers, clip_time, n_params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs per variant (>= 5)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine a second thread "
                        "fights other jobs and makes every step ~10x slower and noisier)")
    p.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks-history.md")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from finitetune.integrations.hf.callback import guard_of

    trainers, timers, clip_time, n_params = _build(args)
    run_medians: dict[str, list[float]] = {"A": [], "B": []}
    guard_per_step, clip_per_step = [], []
    for i in range(args.runs + 1):  # run 0 of each variant is a warm-up, not counted
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            t = trainers[name]
            timers[name].times.clear()
            clip_before = clip_time["s"]
            t.train()
            steps = timers[name].times[1:]
            if i == 0:
                continue
            run_medians[name].append(statistics.median(steps))
            if name == "A":
                clip_per_step.append((clip_time["s"] - clip_before) / args.steps)
            else:
                guard = guard_of(t)
                guard_per_step.append(guard.work_seconds / args.steps)
    med_a = statistics.median(run_medians["A"])
    med_b = statistics.median(run_medians["B"])
    guard_frac = statistics.median(guard_per_step) / med_b
    clip_frac = statistics.median(clip_per_step) / med_a
    ratio = med_b / med_a
    per_run = ", ".join(f"{b / a:.3f}" for a, b in zip(run_medians["A"], run_medians["B"],
                                                       strict=True))
    rows = (
        f"Llama {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}), batch {args.batch} x {args.seq} tokens, fp32, "
        f"{args.threads} torch thread(s), "
        f"{args.runs} runs x {args.steps} steps per variant, interleaved.\n\n"
        "| measure | value |\n|---|---|\n"
        f"| step time guarded / unguarded (median of run medians) | **{ratio:.3f}** |\n"
        f"| per-run ratios | {per_run} |\n"
        f"| guard's own work / median guarded step | {guard_frac:.2%} |\n"
        f"| Trainer's own clipping (replaced by the guard) / median unguarded step | "
        f"{clip_frac:.2%} |\n"
        f"| unguarded median step | {med_a * 1e3:.0f} ms (for scale only) |\n"
    )
    print(rows)
    if not args.no_append:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bench.common import append_result

        print("appended to", append_result("Gradient guard overhead (Trainer step)", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

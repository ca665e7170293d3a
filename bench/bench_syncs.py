"""Host syncs per optimizer step: what the gradient guard adds to a Trainer step (target <= 1).

    python -m bench.bench_syncs                 # 5 runs of 6 steps, GA 1 and 4
    python -m bench.bench_syncs --no-append

Every read of a tensor value on the host (``.item()``, ``float()``, ``.tolist()``, a copy to
the CPU) is a device sync on an accelerator: the GPU queue drains and the step stalls.
The guard may add at most one per optimizer step, whatever the accumulation and
the number of parameters. Counted with ``finitetune.testing.count_host_syncs`` (a torch
dispatch mode) around ``trainer.train()``, for the plain Trainer and the same Trainer with
``GuardCallback()``, on a small Llama on CPU (the count is the same on any device). Logging is
off inside the run: a log line reads the loss and grad norm on its own, and with the guard the
grad norm comes for free. Median of ``--runs`` runs per variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TARGET = 1.0


def _count(ga: int, guarded: bool, steps: int, out: str) -> int:
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    from finitetune import GuardCallback
    from finitetune.testing import count_host_syncs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32))
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 128, (steps * ga * 2, 32), generator=g)
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=ga, learning_rate=1e-3, max_grad_norm=1.0,
        logging_steps=10_000, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, train_sampling_strategy="sequential", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[GuardCallback()] if guarded else [])
    trainer.remove_callback(PrinterCallback)
    with count_host_syncs() as syncs:
        trainer.train()
    return syncs.count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs per variant (median)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    p.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks-history.md")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = tempfile.mkdtemp(prefix="bench_syncs_")
    lines = []
    worst = 0.0
    for ga in (1, 4):
        counts: dict[bool, list[int]] = {False: [], True: []}
        for _ in range(args.runs):
            for guarded in (False, True):
                counts[guarded].append(_count(ga, guarded, args.steps, out))
        plain = statistics.median(counts[False]) / args.steps
        guarded = statistics.median(counts[True]) / args.steps
        added = guarded - plain
        worst = max(worst, added)
        lines.append(f"| gradient accumulation {ga} | {plain:.2f} | {guarded:.2f} | "
                     f"**{added:.2f}** | <= {TARGET:g} |")
    rows = (
        f"Llama 2 layers, hidden 64, batch 2, {args.steps} optimizer steps per run, median of "
        f"{args.runs} runs; syncs counted by `finitetune.testing.count_host_syncs`.\n\n"
        "| setting | Trainer syncs / step | with GuardCallback / step | added by the guard | "
        "target |\n|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    print(rows)
    if not args.no_append:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bench.common import append_result

        print("appended to", append_result("Gradient guard: host syncs per optimizer step",
                                           rows))
    if worst > TARGET:
        print(f"over target: the guard adds {worst:.2f} host syncs per step (target <= {TARGET:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

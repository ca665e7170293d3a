"""The demo's training step with the supervised-only LM head vs the full-logits loss (issue 17).

    python -m bench.bench_demo_step                 # 5 runs x 4 steps per variant, interleaved
    python -m bench.bench_demo_step --runs 3 --no-append

Exactly the demo's set-up (SmolLM2-135M-Instruct, its BBC-topics data, LoRA r=16 on all linear
layers, batch 8, the precision ``finitetune train`` picks, ``GuardCallback``), built with the
recipe's own functions; only the loss differs:

- **old**: ``SafeCausalLMLoss`` on the model's logits (the head at every position; what
  ``finitetune train --loss full`` runs);
- **new**: ``choose_loss(model, "auto")``, the head only at supervised positions (the default).

Two Trainers (each with its own copy of the model) in one process, run alternately (A B B A
...); a run is ``--steps`` optimizer steps, its step time the median of its steps after the
first (``on_step_begin`` -> ``on_step_end``), and the figure the median over runs. Each run
restarts from step 0 with the same seed, so both variants see the same batches. Reports the
ratio; absolute step times drift on shared machines. One torch thread by default (as
``bench_guard``: a second thread fights other jobs on these 2-core machines). The part of the
step the change can touch is also timed alone, precisely (head + loss, forward and backward, on
one of the demo's batches): it bounds the whole-step ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class _StepTimer:
    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self
        self.times: list[float] = []
        self._t0 = 0.0

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer._t0)

        self.callback = _CB()


def _build(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    from transformers import Trainer

    from finitetune.cli.train import resolve_config
    from finitetune.data.collate import CausalLMCollator
    from finitetune.data.pipeline import load_data_records, prepare_rows
    from finitetune.integrations.hf import GuardCallback
    from finitetune.integrations.hidden_loss import choose_loss
    from finitetune.loss import SafeCausalLMLoss
    from finitetune.models import load_model, load_tokenizer, resolve_model
    from finitetune.precision import choose_precision
    from finitetune.recipe import _train_device, apply_lora, split_records, training_arguments

    cfg = resolve_config(None, {"model": "demo", "max_steps": args.steps, "logging_steps": 1000})
    train_recs, _ = split_records(load_data_records(cfg.data, cfg.model, cfg.seed),
                                  cfg.data.eval_size, cfg.seed)
    path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(path)
    rows, _, _ = prepare_rows(train_recs, tokenizer, cfg.data)
    out = tempfile.mkdtemp(prefix="bench_demo_step_")
    trainers, timers, info = {}, {}, {}
    for name in ("old", "new"):
        model = apply_lora(load_model(path), cfg)
        plan = choose_precision(model, device=_train_device(), requested=cfg.precision)
        if name == "new":
            loss, info["line"] = choose_loss(model, "auto")
        else:
            loss = SafeCausalLMLoss()
        timer = _StepTimer()
        targs = training_arguments(cfg, os.path.join(out, name), args.steps, plan)
        targs.save_strategy = "no"
        info["collator"] = CausalLMCollator(tokenizer.pad_token_id)
        trainers[name] = Trainer(
            model=model, args=targs, train_dataset=rows,
            data_collator=CausalLMCollator(tokenizer.pad_token_id),
            compute_loss_func=loss, callbacks=[timer.callback, GuardCallback(cfg.guard)])
        timers[name] = timer
        info["precision"] = str(plan)
    info["rows"] = rows
    sup = [sum(t != -100 for t in r["labels"][1:]) for r in rows]
    info["supervised"] = sum(sup) / sum(len(r["labels"]) for r in rows)
    info["tokens"] = statistics.mean(len(r["labels"]) for r in rows)
    return trainers, timers, info


def _head_and_loss(trainer: Any, info: dict, reps: int) -> dict[str, float]:
    """Median time of the head + loss alone, forward and backward, old vs new, on one of the
    demo's batches (its real final hidden states, as a leaf), under the run's autocast."""
    import torch

    from finitetune.integrations.hidden_loss import autocast_head
    from finitetune.integrations.lm_head import head_spec, unwrap
    from finitetune.loss import SafeCausalLMLoss, causal_lm_loss_from_hidden

    core = unwrap(trainer.model)
    batch = info["collator"](info["rows"][:8])
    amp = torch.bfloat16 if trainer.args.bf16 else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None)
    with torch.no_grad(), autocast:
        hidden = core.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state
    hidden.requires_grad_(True)
    labels = batch["labels"]

    def old() -> None:
        with autocast:
            logits = core.lm_head(hidden)
        SafeCausalLMLoss()(logits, labels).backward()

    def new() -> None:
        causal_lm_loss_from_hidden(hidden, autocast_head(head_spec(core.lm_head), amp),
                                   labels).backward()

    times: dict[str, list[float]] = {"old": [], "new": []}
    for rep in range(reps + 1):
        for name, fn in (("old", old), ("new", new)) if rep % 2 else (("new", new), ("old", old)):
            hidden.grad = None
            t0 = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs per variant (>= 5)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-append", action="store_true", help="do not write docs/benchmarks.md")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    trainers, timers, info = _build(args)
    medians: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(args.runs + 1):  # run 0 of each variant is a warm-up, not counted
        for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
            timers[name].times.clear()
            trainers[name].train()
            if i:
                medians[name].append(statistics.median(timers[name].times[1:]))
    old, new = statistics.median(medians["old"]), statistics.median(medians["new"])
    part = _head_and_loss(trainers["old"], info, reps=7)
    per_run = ", ".join(f"{b / a:.3f}" for a, b in zip(medians["old"], medians["new"],
                                                       strict=True))
    table = (
        f"SmolLM2-135M-Instruct (vocab 49,152), the demo's BBC-topics rows (mean "
        f"{info['tokens']:.0f} tokens, {info['supervised']:.1%} of positions supervised), LoRA "
        f"r=16 all-linear, batch 8, GuardCallback, precision: {info['precision']}; "
        f"{args.threads} torch thread(s); {args.runs} runs x {args.steps} steps per variant, "
        "interleaved; step = median of a run's steps after the first.\n"
        f"New path: {info['line']}.\n\n"
        "| measure | value | target |\n|---|---|---|\n"
        f"| demo step time, new / old (median of run medians) | **{new / old:.3f}** | <= 0.80 |\n"
        f"| per-run ratios | {per_run} | |\n"
        f"| old median step | {old * 1e3:.0f} ms (for scale only) | |\n"
        f"| new median step | {new * 1e3:.0f} ms (for scale only) | |\n"
        f"| head + loss (fwd+bwd, one batch, median of 7) / old median step: old path | "
        f"{part['old'] / old:.1%} | |\n"
        f"| head + loss (fwd+bwd, one batch, median of 7) / old median step: new path | "
        f"{part['new'] / old:.1%} | |\n"
        f"| step ratio if only the head + loss changed (1 - (old - new part) / old step) | "
        f"{1 - (part['old'] - part['new']) / old:.3f} | |\n"
    )
    print(table)
    if not args.no_append:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bench.common import append_result

        print("appended to", append_result("Demo training step: supervised-only LM head vs "
                                           "full logits (issue 17)", table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The demo's training step with the supervised-only LM head vs the full-logits loss.

    python -m bench.bench_demo_step                 # 5 runs x 4 steps per variant, interleaved
    python -m bench.bench_demo_step --runs 3 --no-append

Exactly the demo's set-up (SmolLM2-135M-Instruct, its BBC-topics data, LoRA r=16 on all linear
layers, batch 8, the precision ``finitetune train`` picks, the guard with attribution, metrics and
checkpoint callbacks), built with the recipe's own functions, ``build_trainer`` included; only the
loss differs:

- **old**: ``SafeCausalLMLoss`` on the model's logits (the head at every position; what
  ``finitetune train --loss full`` runs);
- **new**: ``choose_loss(model, "auto")``, the head only at supervised positions (the default).

Two Trainers (each with its own copy of the model) in one process, run alternately (A B B A
...); a run is ``--steps`` optimizer steps, its step time the median of its steps after the
first (``on_step_begin`` -> ``on_step_end``), and the figure the median over runs. Each run
restarts from step 0 with the same seed, so both variants see the same batches. Reports the
ratio; absolute step times drift on shared machines. One torch thread by default (as
``bench_guard``: a second thread fights other jobs on these 2-core machines; on an idle machine
``--threads 2`` is what ``make demo`` uses). One forward + loss + backward is also timed outside
the Trainer, with a third variant, the *floor*: the base model without any head or
cross-entropy. What a loss can save is at most ``old - floor``; ``floor / old`` is the lowest
step ratio any change to the loss could reach on this machine.
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


def _build(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    from bench.common import StepTimer
    from finitetune.data.collate import CausalLMCollator
    from finitetune.data.pipeline import load_data_records, prepare_rows
    from finitetune.integrations.hf.hidden_loss import choose_loss
    from finitetune.integrations.hf.trainer import build_trainer
    from finitetune.loss.causal import SafeCausalLMLoss
    from finitetune.models import load_model, load_tokenizer, resolve_model
    from finitetune.precision.policy import choose_precision
    from finitetune.settings.resolve import resolve_config
    from finitetune.train.recipe import _train_device, apply_lora, split_records, training_arguments

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
        targs = training_arguments(cfg, os.path.join(out, name), args.steps, plan)
        targs.save_strategy = "no"
        # the Trainer `finitetune train` builds (guard, attribution, metrics, checkpoints)
        trainers[name], _ = build_trainer(model, targs, rows, pad_token_id=tokenizer.pad_token_id,
                                          guard=cfg.guard, attribution=cfg.attribution, loss=loss)
        timers[name] = StepTimer()
        trainers[name].add_callback(timers[name].callback)
        info["precision"] = str(plan)
    info["collator"] = CausalLMCollator(tokenizer.pad_token_id)
    info["rows"] = rows
    sup = [sum(t != -100 for t in r["labels"][1:]) for r in rows]
    info["supervised"] = sum(sup) / sum(len(r["labels"]) for r in rows)
    info["tokens"] = statistics.mean(len(r["labels"]) for r in rows)
    return trainers, timers, info


def _forward_backward(trainers: dict, info: dict, reps: int) -> dict[str, float]:
    """Fastest of ``reps`` timings of one forward + loss + backward of the model on one of the
    demo's batches, outside the Trainer (no optimizer, no callbacks), under the run's autocast
    (the minimum: on a shared machine other work only ever adds time, and it is the variants'
    difference, a few percent, that matters here):

    - ``old``: the model's forward (head at every position) and ``SafeCausalLMLoss``;
    - ``new``: the same forward with the hooks of the hidden-state loss and that loss;
    - ``floor``: the base model only (no head, no cross-entropy; the backward starts from the
      mean of the hidden states). No change to the loss can make a step cheaper than this, so
      ``floor / old`` bounds the step ratio any loss can reach on this machine.
    """
    import torch

    from finitetune.integrations.hf.lm_head import unwrap

    batch = dict(info["collator"](info["rows"][:8]))
    labels = batch.pop("labels")
    device = next(trainers["old"].model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = labels.to(device)
    amp = trainers["old"].args.bf16 or trainers["old"].args.fp16
    dtype = torch.bfloat16 if trainers["old"].args.bf16 else torch.float16

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype, enabled=bool(amp))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def full(name: str) -> Any:
        model, loss_fn = trainers[name].model, trainers[name].compute_loss_func

        def run() -> None:
            with autocast():
                loss = loss_fn(model(**batch), labels)
            loss.backward()
        return run

    base = unwrap(trainers["old"].model).model

    def floor() -> None:
        with autocast():
            hidden = base(**batch).last_hidden_state
        hidden.float().mean().backward()

    fns = {"old": full("old"), "new": full("new"), "floor": floor}
    for name in ("old", "new"):
        trainers[name].model.train()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):  # rep 0 warms up; the order alternates
        for name in (list(fns) if rep % 2 else list(reversed(fns))):
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            if rep:
                times[name].append(time.perf_counter() - t0)
            for tr in trainers.values():
                tr.model.zero_grad(set_to_none=True)
    return {k: min(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs per variant (>= 5)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks-history.md")
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
    part = _forward_backward(trainers, info, reps=15)
    per_run = ", ".join(f"{b / a:.3f}" for a, b in zip(medians["old"], medians["new"],
                                                       strict=True))
    table = (
        f"SmolLM2-135M-Instruct (vocab 49,152), the demo's BBC-topics rows (mean "
        f"{info['tokens']:.0f} tokens, {info['supervised']:.1%} of positions supervised), LoRA "
        f"r=16 all-linear, batch 8, `build_trainer` (guard, attribution, metrics), precision: "
        f"{info['precision']}; "
        f"{args.threads} torch thread(s); {args.runs} runs x {args.steps} steps per variant, "
        "interleaved; step = median of a run's steps after the first.\n"
        f"New path: {info['line']}.\n\n"
        "| measure | value | target |\n|---|---|---|\n"
        f"| demo step time, new / old (median of run medians) | **{new / old:.3f}** | <= 0.80 |\n"
        f"| per-run ratios | {per_run} | |\n"
        f"| old median step | {old * 1e3:.0f} ms (for scale only) | |\n"
        f"| new median step | {new * 1e3:.0f} ms (for scale only) | |\n"
        "| forward + loss + backward of one batch (no optimizer, fastest of 15): old | "
        f"{part['old'] * 1e3:.0f} ms | |\n"
        f"| same: new | {part['new'] * 1e3:.0f} ms | |\n"
        f"| same: floor, the base model alone (no head, no cross-entropy) | "
        f"{part['floor'] * 1e3:.0f} ms | |\n"
        f"| new / old, forward + loss + backward | {part['new'] / part['old']:.3f} | |\n"
        f"| floor / old: the lowest ratio any loss could reach here | "
        f"**{part['floor'] / part['old']:.3f}** | |\n"
        f"| share of the old forward + backward that the loss can remove: (old - floor) / old | "
        f"{1 - part['floor'] / part['old']:.1%} | |\n"
        f"| share of it the new path removes: (old - new) / (old - floor) | "
        f"{(part['old'] - part['new']) / (part['old'] - part['floor']):.1%} | |\n"
    )
    print(table)
    if not args.no_append:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bench.common import append_result

        print("appended to", append_result("Demo training step: supervised-only LM head vs "
                                           "full logits", table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

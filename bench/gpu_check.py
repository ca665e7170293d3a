"""GPU check of the precision policy and the guard: one script, a few minutes on one H200.

    python -m bench.gpu_check                          # needs CUDA; appends to docs/benchmarks-history.md
    python -m bench.gpu_check --json-out $OUT/gpu_check.json
    python -m bench.gpu_check --dry-run                # = --device cpu --steps 3 --no-append:
                                                       #   checks the script itself, no GPU needed

Not part of CI (``make test`` never runs it): it is for a session that has a GPU. Phases, each
one printed as it finishes, then one results table (appended to docs/benchmarks-history.md):

1. **plan**: versions, device, and :func:`finitetune.choose_precision` for the model (an H200
   must get bf16, no GradScaler).
2. **guarded bf16 and fp16 runs** of a small Llama (random init, a synthetic bigram chain it
   learns in tens of steps) with ``GuardCallback``: loss first -> last, steps applied / skipped, GradScaler
   calibration skips, ms per step.
3. **fp16 overflow reproduced**: layer 0's post-attention norm weight set to ``--norm-scale``
   (1000; the Gemma pattern of large norm weights, still far below what the weight scan flags)
   makes the MLP's products pass 65504 under fp16 autocast. The same batch is finite in bf16
   and fp32; the first module whose output is non-finite is named.
4. **... and caught**: an fp16 ``Trainer`` with ``GuardCallback`` on that model skips every step
   and halts with ``NonFiniteHalt`` (parameters bit-identical to the start); an unguarded fp16
   ``Trainer`` is run for comparison and what it logged is shown.
5. **guard overhead on GPU**: guarded vs unguarded ``Trainer`` in the plan's dtype, runs
   interleaved A B A B ..., wall time per step (synchronised at the end of each run), median.
6. **DeepSpeed ZeRO-2/3 and 7. FSDP2 on NCCL**, one process per GPU there is
   (``bench/gpu_dist.py``): a NaN on the last rank skipped on every rank, DeepSpeed's
   ``skipped_steps`` equal to the guard's count, the FSDP2 norm equal to torch's, and with 2+
   GPUs a rank whose weights drift named by ``rank_mismatch``. ``--phases`` picks phases.

With ``--device cpu`` fp16 is emulated by wrapping the model's forward in CPU fp16 autocast (the
Trainer ignores ``fp16=True`` on a CPU), so every phase runs, just slowly and without GradScaler.
Exit 0 when every check holds, 1 when one fails, 2 when CUDA is asked for and absent.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = {  # model and batch per device: ~58M params on a GPU (steps not just kernel launches)
    "cuda": {"hidden": 768, "layers": 6, "heads": 12, "vocab": 8192, "seq": 256, "batch": 16},
    "cpu": {"hidden": 64, "layers": 2, "heads": 4, "vocab": 256, "seq": 32, "batch": 4},
}


_OK_CELL = {True: "yes", False: "**NO**", None: ""}
PHASES = ("plan", "bf16", "fp16", "overhead", "deepspeed", "fsdp2")
"""Names for ``--phases`` ("fp16" covers the fp16 run and the fp16 overflow phases)."""


class Results:
    """Checks (name, value, ok: True/False/None for information) and raw numbers for JSON."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, bool | None]] = []
        self.data: dict[str, Any] = {}

    def add(self, name: str, value: str, ok: bool | None = None) -> None:
        self.rows.append((name, value, ok))
        mark = {True: "ok", False: "FAIL", None: "--"}[ok]
        print(f"gpu_check: [{mark}] {name}: {value}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [name for name, _, ok in self.rows if ok is False]

    def markdown(self) -> str:
        out = ["| check | result | ok |", "|---|---|---|"]
        for name, value, ok in self.rows:
            cell = value.replace("|", "\\|")
            out.append(f"| {name} | {cell} | {_OK_CELL[ok]} |")
        return "\n".join(out)


# --------------------------------------------------------------------------- building blocks


def build_model(a: argparse.Namespace, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = a.sizes
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"],
                      intermediate_size=3 * s["hidden"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                      max_position_embeddings=s["seq"], tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)  # fp32 master weights; the Trainer's autocast casts per op


def overflow_model(a: argparse.Namespace) -> Any:
    """The small model with layer 0's post-attention norm weight at ``--norm-scale``."""
    import torch

    model = build_model(a)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.fill_(a.norm_scale)
    return model


def synthetic_data(a: argparse.Namespace, n: int, seed: int = 1) -> list[dict]:
    """Rows of a fixed random bigram chain (token t is always followed by ``nxt[t]``), from a
    random start: learnable within tens of steps, so "the loss went down" means something."""
    import torch

    g = torch.Generator().manual_seed(seed)
    seq, vocab = a.sizes["seq"], a.sizes["vocab"]
    nxt = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    rows = []
    for _ in range(n):
        ids = torch.empty(seq, dtype=torch.long)
        ids[0] = torch.randint(0, vocab, (1,), generator=g)
        for t in range(1, seq):
            ids[t] = nxt[ids[t - 1]]
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _cpu_fp16_autocast(model: Any) -> None:
    """The Trainer ignores fp16 on a CPU; emulate it so the CPU dry run exercises fp16 numerics."""
    import torch

    forward = model.forward

    @functools.wraps(forward)
    def fp16_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.float16):
            return forward(*args, **kwargs)

    model.forward = fp16_forward


def make_trainer(a: argparse.Namespace, model: Any, data: list[dict], dtype: str, guarded: bool,
                 steps: int, logging_steps: int = 1) -> Any:
    from transformers import Trainer, TrainingArguments

    from finitetune import GuardCallback, causal_lm_loss

    cpu = a.device == "cpu"
    if cpu and dtype == "fp16":
        _cpu_fp16_autocast(model)
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="gpu_check_", dir=a.workdir), max_steps=steps,
        per_device_train_batch_size=a.sizes["batch"], learning_rate=a.lr,
        lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=logging_steps,
        save_strategy="no", report_to=[], use_cpu=cpu, bf16=dtype == "bf16",
        fp16=dtype == "fp16" and not cpu, disable_tqdm=True, seed=0,
        remove_unused_columns=False, dataloader_num_workers=0,
        train_sampling_strategy="sequential")
    return Trainer(model=model, args=targs, train_dataset=data, compute_loss_func=causal_lm_loss,
                   callbacks=[GuardCallback()] if guarded else [])


def _sync(a: argparse.Namespace) -> None:
    import torch

    if a.device == "cuda":
        torch.cuda.synchronize()


def _guard(trainer: Any) -> Any:
    from finitetune.integrations.hf.callback import guard_of

    return guard_of(trainer)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else ("nan" if isinstance(x, float) and math.isnan(x) else f"{x:.4g}")


# --------------------------------------------------------------------------- phases


def phase_plan(a: argparse.Namespace, res: Results) -> str:
    from finitetune.cli.env import versions
    from finitetune.precision.policy import choose_precision, describe_device

    v = versions()
    res.add("versions", ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "accelerate",
                                                          "peft", "finitetune")))
    info = describe_device(a.device)
    res.add("device", f"{info.type}: {info.name} ({info.detail}); bf16 "
            + ("native" if info.bf16_native else "emulated" if info.bf16 else "no"))
    plan = choose_precision(build_model(a), device=a.device)
    expect = "bf16" if info.bf16_native else ("fp16" if a.device == "cuda" else "fp32")
    res.add("precision plan (auto)", f"{plan.dtype}, GradScaler "
            f"{'on' if plan.grad_scaler else 'off'}: {plan.reasons[0]}",
            plan.dtype == expect and plan.grad_scaler == (plan.dtype == "fp16"))
    res.data["plan"] = plan.to_dict()
    return plan.dtype


def phase_healthy(a: argparse.Namespace, res: Results, dtype: str) -> None:
    import torch

    trainer = make_trainer(a, build_model(a), synthetic_data(a, a.steps * a.sizes["batch"]),
                           dtype, guarded=True, steps=a.steps)
    t0 = time.perf_counter()
    trainer.train()
    _sync(a)
    per_step = (time.perf_counter() - t0) / a.steps
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    c = dict(_guard(trainer).counters)
    first = losses[0] if losses else math.nan
    last = statistics.fmean(losses[-3:]) if losses else math.nan
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    learned = last < first if a.steps >= 20 else True  # 3 dry-run steps prove nothing about it
    params_ok = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    ok = finite and learned and params_ok and c["nonfinite"] == 0 and c["applied"] > 0
    res.add(f"guarded {dtype} run", f"loss {_fmt(first)} -> {_fmt(last)} in {a.steps} steps; "
            f"applied {c['applied']}, skipped {c['skipped']} (GradScaler calibration "
            f"{c['scaler_overflows']}, non-finite {c['nonfinite']}); {per_step * 1e3:.1f} ms/step",
            ok)
    res.data[f"run_{dtype}"] = {"losses": losses, "counters": c, "s_per_step": per_step}


def forward_check(a: argparse.Namespace, model: Any, batch: dict, dtype: str
                  ) -> tuple[bool, str | None, float]:
    """Forward under autocast(dtype): (logits finite, first module with non-finite output, loss).

    Diagnostic only: one finite flag per module, read back in one sync at the end."""
    import torch
    from torch.nn.modules.module import register_module_forward_hook

    names = {m: n for n, m in model.named_modules()}
    flags: list[tuple[str, Any]] = []

    def hook(module: Any, args: Any, out: Any) -> None:
        t = out[0] if isinstance(out, tuple) and out else getattr(out, "logits", out)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and module in names:
            flags.append((names[module] or "<model>", torch.isfinite(t).all()))

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    handle = register_module_forward_hook(hook)
    try:
        with torch.no_grad(), torch.autocast(a.device, dtype=torch_dtype,
                                             enabled=dtype != "fp32"):
            out = model(**batch)
    finally:
        handle.remove()
    good = torch.stack([f for _, f in flags]).tolist() if flags else []
    first_bad = next((n for (n, _), g in zip(flags, good) if not g), None)
    return bool(torch.isfinite(out.logits).all()), first_bad, float(out.loss)


def phase_overflow(a: argparse.Namespace, res: Results) -> None:
    import torch

    from finitetune.errors import NonFiniteHalt
    from finitetune.precision.policy import choose_precision

    model = overflow_model(a).to(a.device)
    batch = {k: torch.stack([r[k] for r in synthetic_data(a, 4)]).to(a.device)
             for k in ("input_ids", "labels")}
    seen = {d: forward_check(a, model, batch, d) for d in ("fp32", "bf16", "fp16")}
    reproduced = seen["fp32"][0] and seen["bf16"][0] and not seen["fp16"][0]
    res.add("fp16 overflow reproduced",
            f"norm weight {a.norm_scale:g} in layer 0: logits finite in fp32 "
            f"{seen['fp32'][0]} (loss {_fmt(seen['fp32'][2])}), bf16 {seen['bf16'][0]}, fp16 "
            f"{seen['fp16'][0]}; first non-finite output in fp16: {seen['fp16'][1]}", reproduced)
    model.to("cpu")
    try:
        plan = choose_precision(model, device=a.device, requested="fp16")
        res.add("plan for it with --precision fp16", "accepted: the weights are far below "
                f"65504 (largest |w| {_fmt(plan.max_abs_weight)}), only activations overflow; "
                "this is the guard's job", None)
    except Exception as exc:  # a ConfigError here is fine too: it names the fix
        res.add("plan for it with --precision fp16", f"refused: {exc}", None)

    # guarded: skips every step, then halts; nothing reaches the weights
    model = overflow_model(a)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(a, model, synthetic_data(a, a.overflow_steps * a.sizes["batch"]),
                           "fp16", guarded=True, steps=a.overflow_steps)
    halt = None
    try:
        trainer.train()
    except NonFiniteHalt as exc:
        halt = exc
    after = {k: v.detach().to("cpu") for k, v in trainer.model.state_dict().items()}
    intact = all(torch.equal(before[k], after[k]) for k in before)
    c = dict(_guard(trainer).counters)
    diag = halt.diagnosis if halt is not None else {}
    res.add("fp16 overflow caught by the guard",
            f"{'halted (NonFiniteHalt)' if halt else 'did not halt'} at step "
            f"{trainer.state.global_step}: applied {c['applied']}, skipped {c['skipped']} "
            f"(non-finite {c['nonfinite']}, GradScaler {c['scaler_overflows']}); reason "
            f"{diag.get('reason')!s}; parameters bit-identical to the start: {intact}",
            halt is not None and intact and c["applied"] == 0)
    res.data["overflow_guarded"] = {"counters": c, "diagnosis": diag, "intact": intact,
                                    "message": str(halt) if halt else None}

    # unguarded, for comparison: what a user sees without finitetune
    model = overflow_model(a)
    steps = min(10, a.overflow_steps)
    trainer = make_trainer(a, model, synthetic_data(a, steps * a.sizes["batch"]), "fp16",
                           guarded=False, steps=steps)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    shown = ", ".join(f"{_fmt(h['loss'])}/{_fmt(h.get('grad_norm'))}" for h in logs[:4])
    finite_params = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    res.add("same, unguarded (for comparison)",
            f"{steps} steps, logged loss/grad_norm: {shown} ...; parameters finite after: "
            f"{finite_params}", None)
    res.data["overflow_unguarded"] = {"logs": logs, "params_finite": finite_params}


def phase_overhead(a: argparse.Namespace, res: Results, dtype: str) -> None:
    steps, runs = a.overhead_steps, a.overhead_runs
    base = build_model(a)
    data = synthetic_data(a, steps * a.sizes["batch"])
    trainers = {}
    for name, guarded in (("A", False), ("B", True)):
        model = build_model(a)
        model.load_state_dict(base.state_dict())
        trainers[name] = make_trainer(a, model, data, dtype, guarded, steps, logging_steps=10**6)
    per_step: dict[str, list[float]] = {"A": [], "B": []}
    guard_work: list[float] = []
    for i in range(runs + 1):  # run 0 of each is a warm-up (CUDA context, kernels, allocator)
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            t0 = time.perf_counter()
            trainers[name].train()
            _sync(a)
            dt = (time.perf_counter() - t0) / steps
            if i == 0:
                continue
            per_step[name].append(dt)
            if name == "B":
                guard_work.append(_guard(trainers[name]).work_seconds / steps)
    med_a, med_b = statistics.median(per_step["A"]), statistics.median(per_step["B"])
    ratio = med_b / med_a
    frac = statistics.median(guard_work) / med_b
    res.add("guard overhead (Trainer step, guarded / unguarded)",
            f"**{ratio:.3f}** ({dtype}, {runs} runs x {steps} steps interleaved; per run "
            + ", ".join(f"{b / x:.3f}" for x, b in zip(per_step["A"], per_step["B"]))
            + f"); unguarded {med_a * 1e3:.1f} ms/step; guard's own time {frac:.1%} of a step "
            "(on a GPU this includes waiting at its one sync for the step's queued kernels)",
            ratio < 1.25 if runs >= 3 else None)
    res.data["overhead"] = {"ratio": ratio, "per_step": per_step, "guard_work": guard_work}


# --------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dry-run", action="store_true",
                   help="check the script without a GPU: --device cpu --steps 3 --no-append")
    p.add_argument("--steps", type=int, help="steps per healthy run (default 60; cpu 3)")
    p.add_argument("--overflow-steps", type=int,
                   help="max steps of the guarded overflow run (default 40: the guard tolerates "
                        "GradScaler calibration skips before it halts; cpu 10)")
    p.add_argument("--overhead-runs", type=int, help="runs per variant (default 5; cpu 1)")
    p.add_argument("--overhead-steps", type=int, help="steps per run (default 30; cpu 3)")
    p.add_argument("--norm-scale", type=float, default=1000.0,
                   help="norm weight that makes fp16 overflow (default 1000)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip remaining phases after this many seconds (default 420)")
    p.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks-history.md")
    p.add_argument("--json-out", help="also write the raw results here as JSON")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated phases to run (default all: {','.join(PHASES)})")
    a = p.parse_args(argv)
    if a.dry_run:
        a.device, a.no_append = "cpu", True
        a.steps = a.steps or 3
    cpu = a.device == "cpu"
    a.steps = a.steps or (3 if cpu else 60)
    a.overflow_steps = a.overflow_steps or (10 if cpu else 40)
    a.overhead_runs = a.overhead_runs or (1 if cpu else 5)
    a.overhead_steps = a.overhead_steps or (3 if cpu else 30)
    a.sizes = SIZES[a.device]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}). This script is for a session with a GPU; to check the "
              "script itself run: python -m bench.gpu_check --dry-run", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.common import append_result

    res = Results()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        a.workdir = workdir
        dtype = "fp32"
        from bench import gpu_dist

        phases = [("plan", lambda: phase_plan(a, res)),
                  ("bf16 run", lambda: phase_healthy(a, res, "bf16")),
                  ("fp16 run", lambda: phase_healthy(a, res, "fp16")),
                  ("fp16 overflow", lambda: phase_overflow(a, res)),
                  ("overhead", lambda: phase_overhead(a, res, dtype)),
                  ("deepspeed", lambda: gpu_dist.phase_deepspeed(a, res)),
                  ("fsdp2", lambda: gpu_dist.phase_fsdp2(a, res))]
        wanted = {x.strip() for x in a.phases.split(",")}
        for name, run in phases:
            if name.split()[0] not in wanted and name not in wanted:
                continue
            elapsed = time.perf_counter() - start
            if elapsed > a.budget_s:
                res.add(name, f"skipped: {elapsed:.0f} s spent, budget {a.budget_s:.0f} s", False)
                continue
            try:
                out = run()
            except Exception as exc:  # report and go on: one broken phase must not hide the rest
                res.add(name, f"error: {type(exc).__name__}: {exc}", False)
                continue
            if name == "plan":
                dtype = out
    total = time.perf_counter() - start
    res.add("total time", f"{total:.0f} s", total < 480 if a.device == "cuda" else None)
    gpu = torch.cuda.get_device_name() if a.device == "cuda" else "none (CPU dry run)"
    s = a.sizes
    rows = (f"GPU: {gpu}. Llama {s['hidden']} hidden x {s['layers']} layers, vocab {s['vocab']}, "
            f"batch {s['batch']} x {s['seq']} tokens, random init, synthetic bigram-chain "
            "sequences.\n\n" + res.markdown())
    print(rows)
    if a.json_out:
        from finitetune.rundir.jsonio import dumps_strict  # NaN -> null + flag, never a bare NaN

        with open(a.json_out, "w", encoding="utf-8") as f:
            f.write(dumps_strict({"rows": [list(r) for r in res.rows], "data": res.data,
                                  "device": a.device, "gpu": gpu}, indent=2, default=str))
    if not a.no_append:
        print("appended to", append_result("GPU check: precision policy and guard",
                                           rows))
    if res.failed:
        print("gpu_check: FAILED: " + ", ".join(res.failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Distributed phases of ``bench/gpu_check.py``: the guard under DeepSpeed ZeRO and FSDP2 on NCCL.

Each case runs on every GPU the machine has (one process per GPU, NCCL; one GPU gives a world of
one, which still exercises the seams, but not the cross-rank parts), or, for ``--dry-run``, on
2 CPU processes over gloo with DeepSpeed's CPU accelerator. Ranks are spawned with
``finitetune.testing.run_distributed`` (hard timeout: a hang fails the phase, not the script).

- **DeepSpeed** (``phase_deepspeed``): ``Trainer`` + ``GuardCallback`` under ZeRO-2 in bf16 with
  ``bf16.check_grad_overflow: false`` (DeepSpeed alone would apply a NaN step) and under ZeRO-3,
  a NaN in one gradient element of the last rank at step 3: every rank skips step 3, DeepSpeed's
  ``skipped_steps`` equals the guard's count, the weights stay finite; with 2+ GPUs a rank whose
  weights are nudged after step 2 is named by ``rank_mismatch`` at step 3.
- **FSDP2** (``phase_fsdp2``): ``fully_shard`` on every decoder layer and the root, a plain
  guarded loop: the guard's norm equals torch's ``get_total_norm`` on a clean step, and a NaN in
  the last rank's local shard at step 3 is skipped on every rank with the weights unchanged.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from typing import Any

TIMEOUT = 600
FAULT_PARAM = "model.layers.0.mlp.up_proj.weight"


def world(a: argparse.Namespace) -> tuple[int, str]:
    """(processes, backend) for this machine: one per GPU on NCCL, else 2 on gloo."""
    import torch

    if a.device == "cuda":
        return max(1, torch.cuda.device_count()), "nccl"
    return 2, "gloo"


def _setup(device: str) -> tuple[int, int]:
    import torch
    import torch.distributed as dist

    rank, ws = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before transformers imports deepspeed
    return rank, ws


def _ns(opts: dict) -> argparse.Namespace:
    return argparse.Namespace(**opts)


# --------------------------------------------------------------------------- DeepSpeed


def _ds_run(opts: dict, stage: int, out_dir: str, perturb: bool, dtype: str = "bf16") -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from bench.gpu_check import build_model, synthetic_data
    from finitetune import GuardCallback, GuardConfig, NonFiniteHalt
    from finitetune.testing import GradFault

    a = _ns(opts)
    rank, ws = _setup(a.device)
    cpu = a.device == "cpu"
    ds = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
          "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto"}
    if dtype == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": False}
    else:  # dynamic loss scale: overflows while it calibrates are skips too
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    model = build_model(a)
    decisions: list[tuple] = []
    guard_cb = GuardCallback(GuardConfig(rank_check_every=3))

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            o = guard_cb.guard.last_outcome
            decisions.append((o.step, o.applied, o.reason.value if o.reason else None))
            if perturb and rank == ws - 1 and state.global_step == 2:
                with torch.no_grad():  # this rank's copy of one weight drifts
                    dict(model.named_parameters())[FAULT_PARAM].view(-1)[0] += 1e-2

    steps = 6
    targs = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=a.sizes["batch"],
        learning_rate=a.lr, lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=cpu, bf16=dtype == "bf16",
        fp16=dtype == "fp16", disable_tqdm=True, seed=0,
        remove_unused_columns=False, train_sampling_strategy="sequential", deepspeed=ds)
    trainer = Trainer(model=model, args=targs, callbacks=[guard_cb, Watch()],
                      train_dataset=synthetic_data(a, steps * a.sizes["batch"] * ws))
    fault = None if perturb or rank != ws - 1 else GradFault(model, FAULT_PARAM, at={3})
    halted = None
    try:
        trainer.train()
    except NonFiniteHalt as exc:
        halted = str(exc)
    finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    return {"decisions": decisions, "halted": halted, "finite": finite,
            "counters": dict(guard_cb.guard.counters), "fired": fault.fired if fault else [],
            "skipped_steps": trainer.model_wrapped.skipped_steps}


def phase_deepspeed(a: argparse.Namespace, res: Any) -> None:
    """ZeRO-2 bf16 without DeepSpeed's own overflow check, ZeRO-3; rank_mismatch on 2+ ranks."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        res.add("DeepSpeed", "skipped: deepspeed is not installed here (pip install "
                "'finitetune[deepspeed]', or carry its wheel)", None)
        return
    from finitetune.testing import run_distributed

    n, backend = world(a)
    opts = {k: v for k, v in vars(a).items() if k != "workdir"}
    for stage in (2, 3):
        with tempfile.TemporaryDirectory(dir=a.workdir) as out:
            rs = run_distributed(_ds_run, opts, stage, out, False, world_size=n,
                                 backend=backend, timeout=TIMEOUT)
            events = _events(out)
        same = all(r["decisions"] == rs[0]["decisions"] for r in rs)
        skipped = [d[0] for d in rs[0]["decisions"] if not d[1]]
        counts = all(r["skipped_steps"] == r["counters"]["skipped"] == 1 for r in rs)
        ok = same and skipped == [3] and counts and all(r["finite"] for r in rs) and \
            [(e["step"], e["reason"]) for e in events] == [(3, "nonfinite_grad")]
        res.add(f"DeepSpeed ZeRO-{stage} bf16 (check_grad_overflow off), {n} {backend} rank(s)",
                f"NaN in rank {n - 1}'s gradient at step 3 -> skipped steps {skipped} on every "
                f"rank (same decisions: {same}); DeepSpeed skipped_steps = guard count: {counts}; "
                f"weights finite: {all(r['finite'] for r in rs)}; events "
                f"{[(e['step'], e['reason']) for e in events]}", ok)
    if a.device == "cuda":  # no fp16 under DeepSpeed's CPU accelerator
        with tempfile.TemporaryDirectory(dir=a.workdir) as out:
            rs = run_distributed(_ds_run, opts, 2, out, False, "fp16", world_size=n,
                                 backend=backend, timeout=TIMEOUT)
        c = rs[0]["counters"]
        ok = all(r["decisions"] == rs[0]["decisions"] for r in rs) and all(
            r["finite"] and r["skipped_steps"] == r["counters"]["skipped"] for r in rs) \
            and c["nonfinite"] == 0 and c["skipped"] == c["scaler_overflows"] >= 1
        res.add(f"DeepSpeed ZeRO-2 fp16 (dynamic loss scale), {n} rank(s)",
                f"skipped {c['skipped']} (all counted as loss-scale calibration: "
                f"{c['scaler_overflows']}, faults {c['nonfinite']}); DeepSpeed skipped_steps "
                f"{rs[0]['skipped_steps']}; weights finite: {rs[0]['finite']}", ok)
    if n < 2:
        res.add("DeepSpeed rank_mismatch", "skipped: needs 2+ GPUs", None)
        return
    with tempfile.TemporaryDirectory(dir=a.workdir) as out:
        rs = run_distributed(_ds_run, opts, 2, out, True, world_size=n, backend=backend,
                             timeout=TIMEOUT)
        events = _events(out)
    named = events[0].get("mismatch_ranks") if events else None
    ok = all(r["halted"] and "rank_mismatch" in r["halted"] for r in rs) and named == [n - 1]
    res.add("DeepSpeed ZeRO-2 rank_mismatch", f"rank {n - 1}'s weight nudged after step 2 -> "
            f"halted on every rank: {all(bool(r['halted']) for r in rs)}; named {named}", ok)


# --------------------------------------------------------------------------- FSDP2


def _fsdp2_run(opts: dict) -> dict:
    import torch
    from torch.distributed.fsdp import fully_shard

    from bench.gpu_check import build_model, synthetic_data
    from finitetune import Guard, GuardConfig

    a = _ns(opts)
    rank, ws = _setup(a.device)
    model = build_model(a).to(a.device)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    guard = Guard(model, opt, GuardConfig(max_grad_norm=1.0))
    rows = synthetic_data(a, 5 * a.sizes["batch"] * ws, seed=1 + rank)
    out: dict = {"steps": [], "replicated": guard.replicated_grads}
    for step in range(1, 6):
        chunk = rows[(step - 1) * a.sizes["batch"]: step * a.sizes["batch"]]
        batch = {k: torch.stack([r[k] for r in chunk]).to(a.device) for k in ("input_ids",
                                                                                "labels")}
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.device == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        if step == 3 and rank == ws - 1:  # a NaN in this rank's local shard only
            with torch.no_grad():
                model.lm_head.weight.grad.to_local().view(-1)[0] = float("nan")
        if step == 1:  # torch's own total norm over the DTensor gradients (its collectives)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            out["torch_norm"] = torch.nn.utils.get_total_norm(grads).full_tensor().item()
        before = [p.full_tensor() for p in model.parameters()]
        outcome = guard.step()
        opt.zero_grad(set_to_none=True)
        after = [p.full_tensor() for p in model.parameters()]
        out["steps"].append((outcome.applied, outcome.reason.value if outcome.reason else None,
                             all(torch.equal(x, y) for x, y in zip(before, after))))
        if step == 1:
            out["guard_norm"] = outcome.grad_norm
    out["finite"] = all(bool(torch.isfinite(p.full_tensor()).all()) for p in model.parameters())
    return out


def phase_fsdp2(a: argparse.Namespace, res: Any) -> None:
    from finitetune.testing import run_distributed

    n, backend = world(a)
    opts = {k: v for k, v in vars(a).items() if k != "workdir"}
    rs = run_distributed(_fsdp2_run, opts, world_size=n, backend=backend, timeout=TIMEOUT)
    r0 = rs[0]
    same = all(r["steps"] == r0["steps"] for r in rs)
    close = math.isclose(r0["guard_norm"], r0["torch_norm"], rel_tol=1e-4)
    skip = [i + 1 for i, s in enumerate(r0["steps"]) if not s[0]]
    intact = r0["steps"][2][2]
    ok = same and close and skip == [3] and intact and all(r["finite"] for r in rs) \
        and r0["replicated"] is False
    res.add(f"FSDP2 fully_shard, {n} {backend} rank(s)",
            f"guard norm {r0['guard_norm']:.6g} vs torch {r0['torch_norm']:.6g}; NaN in rank "
            f"{n - 1}'s shard at step 3 -> skipped steps {skip} on every rank (same: {same}), "
            f"weights unchanged by the skip: {intact}", ok)


def _events(out: str) -> list[dict]:
    import json

    path = os.path.join(out, "events.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

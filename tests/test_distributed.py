"""Distributed: every rank takes the same decision, from one all-reduce per step.

Real processes, real collectives: each test spawns 2 processes joined in a gloo group on CPU
(``finitetune.testing.run_distributed``) with a hard timeout, so a hang fails the test instead of
blocking the suite, and no child outlives it. Models are a few hundred parameters; what is
checked is bit-identity (``torch.equal``) of parameters and optimizer state across ranks and
across a skipped step, and closeness (1e-6) of 2-rank gradients to one process's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from finitetune import Guard, GuardConfig
from finitetune.guard.policy import Reason
from finitetune.loss.causal import causal_lm_loss
from finitetune.testing import free_port, inject_nonfinite_grad, run_distributed

VOCAB, SEQ = 32, 8
TIMEOUT = 90  # seconds per spawned test; a hang in a collective fails at this point


class TinyLM(nn.Module):
    """Embedding -> MLP -> head: enough for a causal-LM loss, starts in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.mlp = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor, skip_mlp: bool = False) -> torch.Tensor:
        h = self.emb(ids)
        return self.head(h if skip_mlp else torch.tanh(self.mlp(h)))


def _batch(seed: int, rows: int = 2, masked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    labels = ids.clone()
    labels[:, : SEQ // 2] = -100  # a prompt
    if masked:
        labels[:] = -100  # nothing supervised in this micro-batch
    return ids, labels


def _model(ddp: bool = True) -> nn.Module:
    torch.manual_seed(0)  # same initial weights on every rank
    model = TinyLM()
    return nn.parallel.DistributedDataParallel(model) if ddp else model


def _checksum(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter and every optimizer-state tensor, flattened (compared bit for bit)."""
    out = [p.detach().clone().reshape(-1) for p in model.parameters()]
    for state in opt.state.values():
        out += [v.detach().clone().reshape(-1) for v in state.values()
                if isinstance(v, torch.Tensor)]
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _spy_all_reduce() -> list[int]:
    """Count calls of ``torch.distributed.all_reduce`` (the guard's collective; DDP's bucket
    all-reduces go through its C++ reducer during backward and are not counted)."""
    calls: list[int] = []
    original = dist.all_reduce

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = spy
    return calls


# --------------------------------------------------------------------------- rank-local faults


def _faults_on_rank1_only(out_dir: str) -> dict:
    rank = dist.get_rank()
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, GuardConfig(max_grad_norm=1.0), output_dir=out_dir)
    calls = _spy_all_reduce()
    log: dict = {"steps": [], "reduces": [], "unchanged": [], "checksums": []}
    # step 1 clean; 2 NaN in one gradient element on rank 1, after DDP's all-reduce (so rank 0's
    # gradients are clean); 3 NaN loss on rank 1 only (finite gradients); 4 clean
    for step in range(1, 5):
        ids, labels = _batch(100 * step + rank)
        loss = causal_lm_loss(model(ids), labels)
        loss.backward()
        if step == 2 and rank == 1:
            inject_nonfinite_grad(model.module, "mlp.weight", float("nan"), index=5)
        observed = float("nan") if step == 3 and rank == 1 else loss.detach()
        guard.observe_loss(observed, (labels[:, 1:] != -100).sum())
        before = _checksum(model, opt)
        n = len(calls)
        outcome = guard.step()
        opt.zero_grad(set_to_none=True)
        log["reduces"].append(len(calls) - n)
        log["steps"].append((outcome.applied, outcome.reason.value if outcome.reason else None))
        log["unchanged"].append(_same(before, _checksum(model, opt)))
    log["checksums"] = _checksum(model, opt)
    log["adam_steps"] = sorted({float(s["step"]) for s in opt.state.values()})
    return log


def test_nan_grad_or_loss_on_rank1_only_both_ranks_skip_states_stay_equal(tmp_path):
    """A NaN on rank 1 only (a gradient element; then the loss)
    -> both ranks skip, parameters and optimizer state are bit-identical across ranks and across
    the skipped step; exactly one all-reduce per step; rank 0 writes one event per step, naming
    the rank that had the NaN."""
    r0, r1 = run_distributed(_faults_on_rank1_only, str(tmp_path), timeout=TIMEOUT)
    expected = [(True, None), (False, Reason.NONFINITE_GRAD.value),
                (False, Reason.NONFINITE_LOSS.value), (True, None)]
    assert r0["steps"] == r1["steps"] == expected
    assert r0["reduces"] == r1["reduces"] == [1, 1, 1, 1]  # the one-collective rule
    assert r0["unchanged"][1:3] == r1["unchanged"][1:3] == [True, True]  # a skip is a skip
    assert not r0["unchanged"][0] and not r0["unchanged"][3]
    assert _same(r0["checksums"], r1["checksums"])
    assert r0["adam_steps"] == r1["adam_steps"] == [2.0]
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["reason"]) for e in lines] == [(2, "nonfinite_grad"),
                                                         (3, "nonfinite_loss")]
    assert all(e["rank"] == 0 and e["world_size"] == 2 for e in lines)
    assert lines[0]["nonfinite_grad_ranks"] == [1] and lines[0]["nonfinite_loss_ranks"] == []
    assert lines[1]["nonfinite_loss_ranks"] == [1] and lines[1]["nonfinite_grad_ranks"] == []


def _rank_without_gradients() -> dict:
    rank = dist.get_rank()
    model = _model(ddp=False)  # no DDP: a rank may really hold no .grad at all
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # Without DDP the ranks' gradients really differ, which the cross-rank check would rightly
    # report as rank_mismatch: this test is about the vector's layout, so that check is off.
    guard = Guard(model, opt, GuardConfig(rank_check_every=0))
    out = []
    # step 1: rank 1 runs no backward (every .grad None) and observes no loss;
    # step 2: rank 1 skips the MLP (its .grad stays None); step 3: as 2 plus a NaN on rank 0
    for step in (1, 2, 3):
        ids, labels = _batch(step * 10 + rank)
        if rank == 0 or step > 1:
            loss = causal_lm_loss(model(ids, skip_mlp=rank == 1), labels)
            loss.backward()
            guard.observe_loss(loss.detach(), (labels[:, 1:] != -100).sum())
        if step == 3 and rank == 0:
            inject_nonfinite_grad(model, "head.bias", float("nan"))
        o = guard.step()
        opt.zero_grad(set_to_none=True)
        out.append((o.applied, o.reason, o.loss, o.tokens, o.micro_batches))
    return {"outcomes": out, "mlp_grad_seen": model.mlp.weight.grad is not None}


def test_rank_whose_params_get_no_gradient_still_agrees():
    """Done-when 3: ``.grad is None`` on one rank (no backward at all, or an unused module) ->
    the packed vector has the same length on every rank, no hang, the same decision and the
    same reported loss/tokens everywhere (a NaN on the other rank still skips both)."""
    r0, r1 = run_distributed(_rank_without_gradients, timeout=TIMEOUT)
    assert r0["outcomes"] == r1["outcomes"]
    applied = [o[0] for o in r0["outcomes"]]
    assert applied == [True, True, False]
    assert r0["outcomes"][0][4] == 1 and r0["outcomes"][1][4] == 2  # micro-batches, all ranks
    assert r0["outcomes"][2][1] == Reason.NONFINITE_GRAD


# --------------------------------------------------------------------------- exact gradients


def _ddp_gradients_vs_one_process() -> dict:
    """Two windows of 2 micro-batches per rank; window 1: rank 1's 2nd micro-batch is fully
    masked; window 2: rank 1's whole window is masked. Each rank also builds the one-process
    reference on the concatenated batch of both ranks and compares."""
    rank, ws = dist.get_rank(), dist.get_world_size()
    model = _model()
    reference = _model(ddp=False)
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), GuardConfig())
    report = []
    for window in (1, 2):
        micro = {r: [_batch(1000 * window + 10 * r + m,
                            masked=(r == 1 and (m == 1 or window == 2))) for m in range(2)]
                 for r in range(ws)}
        mine = micro[rank]
        local = sum((lab[:, 1:] != -100).sum() for _, lab in mine)
        # COLLECTIVE: the window's supervised tokens over all ranks, as the Trainer gathers them
        n_global = local.clone()
        dist.all_reduce(n_global)
        for m, (ids, labels) in enumerate(mine):
            ctx = model.no_sync() if m == 0 else torch.enable_grad()
            with ctx:
                # DDP averages gradients over ranks: x world size makes it the global token sum
                # over n_global (exactly what the Trainer does with average_tokens_across_devices)
                loss = causal_lm_loss(model(ids), labels, num_items_in_batch=n_global) * ws
                loss.backward()
            guard.observe_loss(loss.detach(), (labels[:, 1:] != -100).sum(),
                               window_normalized=True)
        outcome = guard.decide_and_prepare()  # decide only: the gradients stay for the comparison
        all_ids = torch.cat([ids for r in range(ws) for ids, _ in micro[r]])
        all_labels = torch.cat([lab for r in range(ws) for _, lab in micro[r]])
        ref_loss = causal_lm_loss(reference(all_ids), all_labels)
        reference.zero_grad(set_to_none=True)
        ref_loss.backward()
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        diffs = [(p.grad - q.grad).abs().max().item()
                 for p, q in zip(model.module.parameters(), reference.parameters())]
        report.append({
            "applied": outcome.applied, "max_diff": max(diffs),
            "loss": outcome.loss, "ref_loss": ref_loss.item(), "tokens": outcome.tokens,
            "ref_tokens": int((all_labels[:, 1:] != -100).sum()), "norm": outcome.grad_norm,
            "ref_norm": ref_norm.item(), "empty": outcome.empty_micro_batches,
        })
        model.zero_grad(set_to_none=True)
    return {"report": report}


def test_ddp_gradients_equal_one_process_on_the_concatenated_batch():
    """The safe loss over the *global* token count (all ranks, whole
    accumulation window) gives 2-rank DDP gradients equal to one process's on the concatenated
    batch within 1e-6, including a fully masked micro-batch and a fully masked rank; the guard
    reports the same loss, token count and norm as the one-process reference."""
    r0, r1 = run_distributed(_ddp_gradients_vs_one_process, timeout=TIMEOUT)
    assert r0 == r1  # same numbers on both ranks
    for window, empty in zip(r0["report"], (1, 2)):
        assert window["applied"] and window["empty"] == empty
        assert window["max_diff"] < 1e-6, window
        assert abs(window["loss"] - window["ref_loss"]) < 1e-6
        assert window["tokens"] == window["ref_tokens"]
        assert abs(window["norm"] - window["ref_norm"]) < 1e-5 * window["ref_norm"]


# --------------------------------------------------------------------------- FSDP2 (fully_shard)


def _fully_shard_guard() -> dict:
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = TinyLM()
    for module in (model.mlp, model.head, model):
        fully_shard(module)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, GuardConfig(max_grad_norm=0.5))
    calls = _spy_all_reduce()
    out = {"replicated": guard.replicated_grads, "steps": []}
    for step in (1, 2):
        ids, labels = _batch(step * 7 + rank)
        causal_lm_loss(model(ids), labels).backward()
        if step == 2 and rank == 1:  # a NaN in rank 1's local shard only
            model.head.weight.grad.to_local().view(-1)[0] = float("nan")
        if step == 1:
            # torch's own total norm over the DTensor grads (its own collectives) and the
            # gradients torch's clip_grad_norm_ would leave, to compare with the guard's
            full = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            expected_norm = full.full_tensor().item()
            coef = min(1.0, 0.5 / (expected_norm + 1e-6))
            expected = [p.grad.full_tensor() * coef for p in model.parameters()]
        before = [p.full_tensor() for p in model.parameters()]  # collectives, outside the spy
        n = len(calls)
        outcome = guard.decide_and_prepare()
        out["steps"].append((outcome.applied, outcome.reason, len(calls) - n))
        if step == 1:
            clipped = [p.grad.full_tensor() for p in model.parameters()]
            out["norm"], out["expected_norm"] = outcome.grad_norm, expected_norm
            out["clip_diff"] = max((a - b).abs().max().item() for a, b in zip(clipped, expected))
        if outcome.applied:
            opt.step()
        opt.zero_grad(set_to_none=True)
        after = [p.full_tensor() for p in model.parameters()]
        out["steps"][-1] += (_same(before, after),)
    out["params"] = [p.full_tensor() for p in model.parameters()]
    return out


def test_fully_shard_sums_shard_norms_and_skips_on_both_ranks():
    """Done-when FSDP (item 4): with FSDP2 ``fully_shard`` on gloo the gradients are DTensor
    shards: the guard detects that, adds up the squared shard norms (not divided by the world
    size), gets torch's total norm and clipping, and a NaN in one rank's shard skips the step
    on both ranks, still with one all-reduce."""
    r0, r1 = run_distributed(_fully_shard_guard, timeout=TIMEOUT)
    assert r0["replicated"] is False
    assert r0["steps"] == r1["steps"] == [(True, None, 1, False),
                                          (False, Reason.NONFINITE_GRAD, 1, True)]
    assert abs(r0["norm"] - r0["expected_norm"]) < 1e-6 * r0["expected_norm"]
    assert r0["clip_diff"] < 1e-7
    assert _same(r0["params"], r1["params"])


# --------------------------------------------------------------------------- Trainer + DDP


def _trainer_ddp_nan_on_rank1(out_dir: str) -> dict:
    from transformers import Trainer, TrainingArguments

    from finitetune import GuardCallback
    from finitetune.errors import ConfigError
    from finitetune.integrations.hf.callback import guard_of
    from finitetune.loss.causal import SafeCausalLMLoss
    from finitetune.testing import GradFault

    rank = dist.get_rank()
    from finitetune.testing.models import tiny_llama

    model = tiny_llama(vocab=VOCAB, hidden=16, heads=2, positions=SEQ)
    rows = [{"input_ids": ids[0], "labels": labels[0]}
            for ids, labels in (_batch(i, rows=1) for i in range(16))]
    args = TrainingArguments(
        output_dir=out_dir, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        average_tokens_across_devices=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      compute_loss_func=SafeCausalLMLoss(), callbacks=[GuardCallback()])
    # rank 1 only: a NaN in one gradient element in the 2nd backward pass (= step 2)
    fault = GradFault(model, "model.layers.0.mlp.up_proj.weight", at={2}) if rank == 1 else None
    trainer.train()
    if fault is not None:
        fault.remove()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") \
        else trainer.optimizer
    guard = guard_of(trainer)
    out = {"skipped": guard.counters["skipped"], "applied": guard.counters["applied"],
           "checksums": _checksum(model, opt)}
    # The Trainer's FSDP option on CPU: accelerate silently trains with DDP instead, so the
    # callback refuses at start-up (on every rank alike: no rank is left waiting).
    fsdp_args = TrainingArguments(
        output_dir=out_dir, max_steps=1, per_device_train_batch_size=2, use_cpu=True,
        report_to=[], save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
        fsdp=True, fsdp_config={"fsdp_version": 2})
    try:  # refused when the Trainer is built (the callback checks it there), before any step
        Trainer(model=model, args=fsdp_args, train_dataset=rows,
                compute_loss_func=SafeCausalLMLoss(), callbacks=[GuardCallback()]).train()
        out["fsdp_error"] = None
    except ConfigError as exc:
        out["fsdp_error"] = str(exc)
    return out


def test_trainer_ddp_nan_on_rank1_only_skips_on_both_ranks(tmp_path):
    """Done-when 1 and 3 through ``GuardCallback``: a Trainer under DDP (gloo, 2 ranks, the
    safe loss over the global token count) with a NaN gradient element on rank 1 only at step 2
    -> both ranks skip step 2 and end bit-identical; rank 0 writes the one event. Item 4: the
    Trainer's FSDP option, which cannot shard on CPU, stops with a ConfigError at start-up."""
    r0, r1 = run_distributed(_trainer_ddp_nan_on_rank1, str(tmp_path), timeout=TIMEOUT)
    assert r0["skipped"] == r1["skipped"] == 1 and r0["applied"] == r1["applied"] == 2
    assert _same(r0["checksums"], r1["checksums"])
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["reason"], e["rank"], e["world_size"]) for e in lines] == [
        (2, "nonfinite_grad", 0, 2)]
    assert 1 in lines[0]["nonfinite_grad_ranks"]
    assert r0["fsdp_error"] and "falls back to DDP" in r0["fsdp_error"]
    assert r1["fsdp_error"] == r0["fsdp_error"]


# --------------------------------------------------------------------------- the runner


def _rank1_raises_while_rank0_waits() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # never completed: rank 1 is gone


def test_runner_fails_fast_and_kills_the_waiting_rank():
    """A rank that raises while another waits in a collective fails the call with that rank's
    traceback within seconds (no hang), and no child survives."""
    import multiprocessing as mp
    import time

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_distributed(_rank1_raises_while_rank0_waits, timeout=TIMEOUT)
    assert time.monotonic() - t0 < TIMEOUT - 10  # failed fast, not by the hang timeout
    assert not [p for p in mp.active_children() if p.is_alive()]


# --------------------------------------------------------------------------- the main job


def _launcher(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} not installed")
        return found
    return str(path)


def test_torchrun_train_two_ranks_writes_one_consistent_run_dir(tmp_path):
    """Done-when 5: ``torchrun --nproc_per_node 2 -m finitetune train`` finishes and rank 0
    writes one consistent run directory (no duplicate metric lines, eval and final model once).

    Uses ``--model tiny`` (a 0.6M-parameter Llama) with 4 steps and a small eval set: the
    embedded demo model (SmolLM2-135M) is far too slow for a test on a 2-core CPU.
    """
    out = tmp_path / "run"
    cmd = [_launcher("torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "finitetune", "train", "--model", "tiny",
           "--max-steps", "4", "--logging-steps", "1", "--eval-size", "20",
           "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # torchrun and both ranks
        proc.communicate()
        pytest.fail("torchrun train did not finish within 240 s (hang?)")
    assert proc.returncode == 0, text[-3000:]
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "label_report.json", "report.md"):
        assert (out / name).is_file(), name
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # rank 0 only: no duplicates
    # the window loss of metrics.jsonl covers both ranks: 2 x batch 16 rows of tokens
    assert all(m["loss"] is not None and m["tokens"] > 0 for m in metrics)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["global_step"] == 4 and ev["after"]["total"] > 0
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "checkpoint-4" / "model.safetensors").is_file()
    assert text.count("finitetune: exact match:") == 1  # rank 0 reports, once

"""Adaptive clipping (``GuardConfig(clip="adaptive")``): the threshold, what it cuts, its
history across a resume and across ranks, and its two optional parts.

"Control" runs are the same seed and data; equality is ``torch.equal`` on every parameter and
optimizer-state entry (``finitetune.testing.assert_same_state``), and on the guard's state.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from finitetune import Guard, GuardConfig
from finitetune.errors import ConfigError
from finitetune.guard.clipping import ADAGC_RELATIVE, AdaptiveClip, cut_applied
from finitetune.guard.policy import Action, Reason
from finitetune.testing import (
    assert_same_state,
    count_host_syncs,
    inject_nonfinite_grad,
    run_distributed,
)

VOCAB, SEQ, BATCH = 32, 8, 4
ADAPTIVE = GuardConfig(clip="adaptive", clip_warmup=5, max_grad_norm=100.0)

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyLM(nn.Module):
    """Embedding -> MLP -> head: enough for a causal-LM loss, starts in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.mlp = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mlp(self.emb(ids))))


def _loss(model: nn.Module, step: int, rank: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    logits = model(ids)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _setup(cfg: GuardConfig, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Guard]:
    torch.manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, Guard(model, opt, cfg)


def _train(model, opt, guard, steps, *, spike=(), nan=(), start=1, record=None):
    """Steps ``start..steps``; the loss (so every gradient) x50 on ``spike`` steps, a NaN
    gradient element on ``nan`` steps. ``record`` gets (outcome, threshold, post-clip norm)."""
    for i in range(start, steps + 1):
        loss = _loss(model, i) * (50.0 if i in spike else 1.0)
        guard.observe_loss(loss.detach(), BATCH * (SEQ - 1))
        loss.backward()
        if i in nan:
            inject_nonfinite_grad(model, "mlp.weight", math.nan, index=3)
        threshold = guard.clip.threshold()
        outcome = guard.decide_and_prepare()
        if outcome.applied:
            post = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()])).item()
            opt.step()
        else:
            post = math.nan
        if record is not None:
            record.append((outcome, threshold, post))
        opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- the threshold


def test_zclip_arithmetic_warmup_threshold_reciprocal_cut_and_cap():
    # Must: during warm-up only the cap (max_grad_norm) acts; then the EMA starts from the
    # warm-up's mean and variance; a norm whose z-score passes clip_z is cut to
    # mean + z_max^2 * std / z; the EMA takes the cut value; a norm below the threshold leaves
    # only the cap; nothing is ever above max_grad_norm, and a cut above the cap is not
    # counted as one (it only feeds the history).
    clip = AdaptiveClip(GuardConfig(clip="adaptive", clip_warmup=4, max_grad_norm=5.0), 5.0)
    for norm in (1.0, 2.0, 1.0, 2.0):
        assert clip.limit(norm) == (5.0, None) and clip.threshold() == 5.0
        clip.update(norm, None)
    assert (clip.mean, clip.var) == (1.5, 0.25)
    assert clip.threshold() == pytest.approx(1.5 + 2.5 * 0.5)
    assert clip.limit(2.0) == (5.0, None)  # z = 1: no cut
    limit, cut = clip.limit(4.0)  # z = 5
    assert cut == pytest.approx(1.5 + 2.5 ** 2 * 0.5 / 5) == limit
    assert cut_applied((limit, cut))
    clip.update(4.0, cut)
    assert clip.mean == pytest.approx(0.97 * 1.5 + 0.03 * cut)
    high = AdaptiveClip(GuardConfig(clip="adaptive", clip_warmup=2, max_grad_norm=1.0), 1.0)
    for norm in (10.0, 12.0):
        high.update(norm, None)
    assert high.threshold() == 1.0 and high.limit(40.0)[0] == 1.0  # the cap wins
    assert high.limit(40.0)[1] > 1.0 and not cut_applied(high.limit(40.0))


def test_a_spike_is_cut_to_the_adaptive_threshold_and_nothing_else_changes():
    # Fault: every gradient x50 at step 9 (after a 5-step warm-up), max_grad_norm=100 far
    # above. Must: applied (no skip: clipping is the answer), its post-clip norm equals the
    # adaptive cut (below the pre-clip norm and the cap), counted in adaptive_clipped; the
    # other steps are untouched (post == pre); fixed clipping with the same cap leaves the
    # spike at its full size.
    model, opt, guard = _setup(ADAPTIVE)
    rec: list = []
    _train(model, opt, guard, 12, spike={9}, record=rec)
    spike, threshold, post = rec[8]
    assert spike.applied and spike.clipped and spike.reason is None
    assert post == pytest.approx(spike.detail["adaptive_clip"], rel=1e-4)
    assert post < threshold < spike.grad_norm and post < 100.0
    assert guard.counters["adaptive_clipped"] == 1
    for outcome, _, after in rec[:8] + rec[9:]:
        assert not outcome.clipped and after == pytest.approx(outcome.grad_norm, rel=1e-5)
    fmodel, fopt, fixed = _setup(GuardConfig(max_grad_norm=100.0))
    frec: list = []
    _train(fmodel, fopt, fixed, 9, spike={9}, record=frec)
    assert frec[8][2] == pytest.approx(frec[8][0].grad_norm, rel=1e-5)
    assert frec[8][2] > 10 * post


def test_nonfinite_steps_are_skipped_as_before_and_never_enter_the_history():
    # Fault: NaN in one gradient element at steps 3 (warm-up) and 8 (after it). Must: both
    # skipped as nonfinite_grad; the state equals a control run with adaptive clipping that
    # never saw batches 3 and 8 (so the history holds only applied steps' norms).
    model, opt, guard = _setup(ADAPTIVE)
    rec: list = []
    _train(model, opt, guard, 12, nan={3, 8}, record=rec)
    assert [(o.step, o.reason) for o, _, _ in rec if not o.applied] == [
        (3, Reason.NONFINITE_GRAD), (8, Reason.NONFINITE_GRAD)]
    cmodel, copt, control = _setup(ADAPTIVE)
    for i in [i for i in range(1, 13) if i not in (3, 8)]:
        loss = _loss(cmodel, i)
        control.observe_loss(loss.detach(), BATCH * (SEQ - 1))
        loss.backward()
        control.step()
        copt.zero_grad(set_to_none=True)
    assert_same_state(model, cmodel, opt, copt)
    assert guard.clip.state_dict() == control.clip.state_dict()
    assert all(math.isfinite(v) for v in (guard.clip.mean, guard.clip.var))


def test_adaptive_clipping_adds_no_host_sync():
    # Must: one host sync per step's decision with adaptive clipping and per-tensor thresholds
    # on, as with fixed clipping (the threshold is host arithmetic on the already-read norm;
    # the per-tensor factors stay on the device).
    cfg = GuardConfig(clip="adaptive", clip_warmup=2, clip_per_tensor=True, max_grad_norm=1.0)
    model, opt, guard = _setup(cfg)
    _train(model, opt, guard, 3)
    for i in range(4, 7):
        loss = _loss(model, i)
        guard.observe_loss(loss.detach(), BATCH * (SEQ - 1))
        loss.backward()
        with count_host_syncs() as syncs:
            guard.decide_and_prepare()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert syncs.count == 1, syncs.where


# --------------------------------------------------------------------------- resume


def test_resume_continues_the_threshold_bit_identically(tmp_path):
    # Must: a run checkpointed after step 7 (model, optimizer, guard state as strict JSON:
    # the EMA mid-warm-up of the per-tensor part, past it for the global one) and resumed
    # in fresh objects gives, on steps 8-14 (a spike at 11 included), the same thresholds, the
    # same cuts and the same final state as the uninterrupted run.
    cfg_pt = GuardConfig(clip="adaptive", clip_warmup=5, max_grad_norm=100.0,
                         clip_per_tensor=True)
    full_m, full_o, full_g = _setup(cfg_pt)
    full: list = []
    _train(full_m, full_o, full_g, 14, spike={11}, record=full)

    m, o, g = _setup(cfg_pt)
    _train(m, o, g, 7)
    torch.save({"model": m.state_dict(), "opt": o.state_dict()}, tmp_path / "ckpt.pt")
    (tmp_path / "guard.json").write_text(json.dumps(g.state_dict(), allow_nan=False))
    ckpt = torch.load(tmp_path / "ckpt.pt")
    m2, o2, _ = _setup(cfg_pt, seed=99)
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    g2 = Guard(m2, o2, cfg_pt)
    g2.load_state_dict(json.loads((tmp_path / "guard.json").read_text()))
    resumed: list = []
    _train(m2, o2, g2, 14, spike={11}, start=8, record=resumed)
    assert [(t, o.detail.get("adaptive_clip")) for o, t, _ in full[7:]] == [
        (t, o.detail.get("adaptive_clip")) for o, t, _ in resumed]
    assert full[10][0].detail.get("adaptive_clip") is not None  # the spike was cut
    assert_same_state(full_m, m2, full_o, o2)
    assert g2.state_dict() == full_g.state_dict()


# --------------------------------------------------------------------------- two ranks


def _two_ranks_adaptive() -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(TinyLM())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, GuardConfig(clip="adaptive", clip_warmup=4, max_grad_norm=100.0))
    out: dict = {"thresholds": [], "cuts": [], "state": None}
    for step in range(1, 13):
        # different data on each rank; the loss x50 on rank 1 only at step 9
        loss = _loss(model, step, rank) * (50.0 if step == 9 and rank == 1 else 1.0)
        guard.observe_loss(loss.detach(), BATCH * (SEQ - 1))
        loss.backward()
        out["thresholds"].append(guard.clip.threshold())
        outcome = guard.step()
        out["cuts"].append(outcome.detail.get("adaptive_clip"))
        opt.zero_grad(set_to_none=True)
    out["state"] = json.dumps(guard.clip.state_dict())
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


def test_two_ranks_hold_the_same_threshold_every_step():
    # Two gloo ranks, DDP, different data per rank; rank 1 alone has a x50 loss at step 9.
    # Must: every step's threshold, every cut and the final history are bit-identical on both
    # ranks (they come from the reduced norm), step 9 is cut on both, parameters stay equal.
    r0, r1 = run_distributed(_two_ranks_adaptive, timeout=90)
    assert r0["thresholds"] == r1["thresholds"] and r0["cuts"] == r1["cuts"]
    assert r0["state"] == r1["state"]
    assert r0["cuts"][8] is not None and sum(c is not None for c in r0["cuts"]) >= 1
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))


# --------------------------------------------------------------------------- optional parts


def test_per_tensor_thresholds_cut_only_the_tensor_that_jumped():
    # Fault: after the warm-up, the head's bias gradient alone x40 (its norm far above the EMA
    # of its own norm). Must: that tensor is cut to 1.05x its EMA; a tensor at its usual size
    # keeps its gradient (the global threshold is set out of reach: clip_z=1e6, to see the
    # per-tensor part alone).
    cfg = GuardConfig(clip="adaptive", clip_warmup=3, clip_per_tensor=True, max_grad_norm=1e6,
                      clip_z=1e6)
    model, opt, guard = _setup(cfg)
    _train(model, opt, guard, 3)
    loss = _loss(model, 4)
    guard.observe_loss(loss.detach(), BATCH * (SEQ - 1))
    loss.backward()
    model.head.bias.grad.mul_(40.0)
    ema = guard._per_tensor.ema.clone()
    before = [p.grad.clone() for p in model.parameters()]
    guard.decide_and_prepare()
    names = [n for n, _ in model.named_parameters()]
    bias = names.index("head.bias")
    assert model.head.bias.grad.norm().item() == pytest.approx(
        ADAGC_RELATIVE * ema[bias].item(), rel=1e-5)
    kept = [i for i, b in enumerate(before) if b.norm() <= ADAGC_RELATIVE * ema[i]]
    assert kept, "some tensor stayed below its threshold"
    for i in kept:
        assert torch.equal(list(model.parameters())[i].grad, before[i])


def test_moment_reset_after_a_cut_restarts_adam_as_at_step_one():
    # Fault: every gradient x50 at step 7 with reset_moments_on_spike. Must: the step is cut
    # and applied; afterwards Adam's moments hold only that (clipped) gradient, exactly as a
    # fresh AdamW's first step on it would (step count 1); counted in moment_resets.
    cfg = GuardConfig(clip="adaptive", clip_warmup=4, max_grad_norm=100.0,
                      reset_moments_on_spike=True)
    model, opt, guard = _setup(cfg)
    _train(model, opt, guard, 6)
    resets = guard.counters["moment_resets"]
    loss = _loss(model, 7) * 50.0
    guard.observe_loss(loss.detach(), BATCH * (SEQ - 1))
    loss.backward()
    outcome = guard.decide_and_prepare()
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert outcome.detail.get("adaptive_clip") is not None
    assert guard.counters["moment_resets"] == resets + 1
    fresh_params = [nn.Parameter(p.clone()) for p in params]
    fresh = torch.optim.AdamW(fresh_params, lr=1e-2)
    for p, g in zip(fresh_params, grads, strict=True):
        p.grad = g
    fresh.step()
    for p, q in zip(model.parameters(), fresh_params, strict=True):
        assert torch.equal(p.detach(), q.detach())
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh.state[q][key])


def test_the_optional_parts_need_adaptive_clipping():
    with pytest.raises(ConfigError, match="clip_per_tensor"):
        GuardConfig(clip_per_tensor=True)
    with pytest.raises(ConfigError, match="reset_moments_on_spike"):
        GuardConfig(reset_moments_on_spike=True)
    with pytest.raises(ConfigError, match="clip"):
        GuardConfig(clip="zclip")


def test_logs_and_events_carry_the_threshold_and_the_cuts(tmp_path):
    # Must: the training logs get guard/clip_threshold (the threshold in force) and
    # guard/adaptive_clipped; an event line (here a skipped NaN step) carries clip_threshold;
    # fixed clipping logs neither (a plain run's logs are unchanged).
    model, opt, guard = _setup(ADAPTIVE)
    guard.output_dir = tmp_path
    rec: list = []
    _train(model, opt, guard, 10, spike={8}, nan={9}, record=rec)
    logs = guard.log_counters()
    assert logs["guard/clip_threshold"] == guard.clip.threshold()
    assert logs["guard/adaptive_clipped"] == guard.counters["adaptive_clipped"] >= 1
    event = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[-1])
    assert event["reason"] == "nonfinite_grad" and event["action"] == Action.SKIP.value
    assert event["clip_threshold"] == rec[8][1]  # the threshold in force at step 9
    _, _, fixed = _setup(GuardConfig(max_grad_norm=1.0))
    assert not any("clip" in k for k in fixed.log_counters())


# --------------------------------------------------------------------------- the switch


def test_clip_adaptive_switch_in_train_and_run_and_the_report_draws_the_threshold(
        tmp_path, tiny_model_dir):
    # `finitetune train --clip adaptive` (warm-up 3 steps from the YAML file) on the tiny
    # model. Must: config.yaml records it, every metrics line carries guard/clip_threshold and
    # guard/adaptive_clipped, the report's grad-norm plot draws the threshold line, the report
    # text lists the counter; `finitetune run --clip adaptive` builds the same GuardConfig and
    # a bad value exits 2.
    import argparse

    import yaml

    from finitetune.builtin.tasks import tiny_task
    from finitetune.cli.main import main
    from finitetune.cli.run import guard_config
    from finitetune.report import health_report, to_markdown
    from finitetune.report.plots import figures

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                            for r in tiny_task(64, seed=7)))
    (tmp_path / "c.yaml").write_text("guard:\n  clip_warmup: 3\n")
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir",
                 str(out), "--config", str(tmp_path / "c.yaml"), "--clip", "adaptive",
                 "--max-steps", "8", "--eval-size", "8", "--lora-r", "0", "--logging-steps",
                 "1", "--no-eval-before"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["guard"]["clip"] == "adaptive"
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in metrics if "loss" in m]
    assert len(lines) == 8 and all("guard/adaptive_clipped" in m for m in lines)
    thresholds = [m["guard/clip_threshold"] for m in lines]
    assert all(0 < t <= 1.0 for t in thresholds)  # never above --max-grad-norm (1.0)
    report = health_report(out)
    (_, fig), = [(t, f) for t, f in figures(report) if t.startswith("Gradient norm")]
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "run: adaptive clip threshold" in labels
    assert "guard/adaptive_clipped" in to_markdown(report)
    cfg = guard_config(argparse.Namespace(config=None, guard_policy=None,
                                          max_consecutive_skips=None, clip="adaptive"))
    assert cfg.clip == "adaptive"
    with pytest.raises(SystemExit) as bad:
        main(["run", "--clip", "zclip", "--", "python"])
    assert bad.value.code == 2


def test_trainer_resume_continues_the_threshold_bit_identically(tmp_path):
    # A Trainer with GuardCallback(clip="adaptive"), checkpoint at step 5 (the history is past
    # its 3-step warm-up), the loss x50 at step 8. Must: a fresh Trainer resumed from
    # checkpoint-5 logs the same threshold on steps 6-10, cuts step 8 as the uninterrupted run
    # does, and ends with equal model, optimizer, scheduler and guard state.
    from transformers import Trainer, TrainingArguments

    from finitetune import GuardCallback
    from finitetune.integrations.hf.callback import guard_of
    from finitetune.testing import LossScale
    from finitetune.testing import models as testing_models

    rows = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(5))
    data = [{"input_ids": r, "labels": r} for r in rows]
    cfg = GuardConfig(clip="adaptive", clip_warmup=3)

    def make(out: str, spike_call: int) -> Trainer:
        args = TrainingArguments(
            output_dir=out, max_steps=10, per_device_train_batch_size=4, learning_rate=1e-2,
            lr_scheduler_type="constant", max_grad_norm=100.0, logging_steps=1,
            save_strategy="steps", save_steps=5, report_to="none", use_cpu=True,
            disable_tqdm=True, seed=0)
        model = testing_models.tiny_llama(vocab=64, kv_heads=2, positions=16)
        t = Trainer(model=model, args=args, train_dataset=data, callbacks=[GuardCallback(cfg)])
        LossScale(t.model, 50.0, at={spike_call})  # counts this Trainer's forward calls
        return t

    def thresholds(t: Trainer) -> dict[int, float]:
        return {h["step"]: h["guard/clip_threshold"] for h in t.state.log_history
                if "guard/clip_threshold" in h}

    a = make(str(tmp_path / "a"), 8)
    a.train()
    b = make(str(tmp_path / "b"), 3)  # resumed after step 5: its 3rd forward is step 8
    b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    ta, tb = thresholds(a), thresholds(b)
    assert [ta[s] for s in range(6, 11)] == [tb[s] for s in range(6, 11)]
    assert guard_of(a).counters["adaptive_clipped"] >= 1
    assert guard_of(b).state_dict() == guard_of(a).state_dict()
    assert_same_state(a.model, b.model, a.optimizer, b.optimizer, a.lr_scheduler, b.lr_scheduler)

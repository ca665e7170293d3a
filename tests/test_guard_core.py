"""``Guard`` in a plain PyTorch loop: every fault it must catch, and what a skip leaves untouched.

Every fault test names the fault, where it is injected and what must hold. "Control" is the
same seed and data with the bad step simply not taken, run *without* the guard (plain
``optimizer.step()``, torch's own ``clip_grad_norm_``); equality is ``torch.equal`` on every
parameter, every optimizer-state entry (moments, ``step``), the param groups and the scheduler
(``finitetune.testing.assert_same_state``). The scheduler is a linear decay over a fixed length,
so a skip that wrongly advanced it would show.
"""

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from finitetune import Guard, GuardConfig, NonFiniteHalt
from finitetune.guard.policy import Action, Reason
from finitetune.loss.causal import causal_lm_loss
from finitetune.testing import (
    GradFault,
    assert_same_state,
    count_host_syncs,
    inject_nonfinite_grad,
)
from finitetune.testing import models as testing_models

VOCAB, SEQ, BATCH = 64, 16, 4
G = torch.Generator().manual_seed(1234)
DATA = torch.randint(0, VOCAB, (48, 4, BATCH, SEQ), generator=G)  # [step][micro-batch]
UP = "model.layers.0.mlp.up_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(layers: int = 1, seed: int = 0) -> LlamaForCausalLM:
    return testing_models.tiny_llama(vocab=VOCAB, layers=layers, kv_heads=2, positions=SEQ,
                                     seed=seed)


def adamw(params, kind="foreach", lr=1e-2, wd=0.1):
    flags = {"foreach": dict(foreach=True), "fused": dict(fused=True)}[kind]
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **flags)


def linear_decay(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 100)


def mb_loss(model, ids, labels=None):
    out = model(input_ids=ids, labels=ids if labels is None else labels)
    return out.loss


def run(steps, *, guarded=True, drop=(), cfg=None, kind="foreach", ga=1, clip=None,
        model=None, opt=None, before_step=None, loss_fn=mb_loss, labels=None, guard_kwargs=None):
    """Train on DATA[:steps] minus ``drop``; ``before_step(i, model)`` may inject a fault into
    the gradients of step ``i`` (1-based). Returns (model, opt, sched, guard, outcomes)."""
    model = model or tiny_llama()
    opt = opt or adamw(model.parameters(), kind)
    sched = linear_decay(opt)
    guard = None
    if guarded:
        cfg = cfg or GuardConfig(max_grad_norm=clip)
        guard = Guard(model, opt, cfg, scheduler=sched, **(guard_kwargs or {}))
    outcomes = []
    for i in [i for i in range(1, steps + 1) if i not in drop]:
        for m in range(ga):
            ids = DATA[i - 1, m]
            lab = labels(i, m, ids) if labels else None
            loss = loss_fn(model, ids, lab)
            if guard is not None:
                n = None if lab is None else lab[:, 1:].ne(-100).sum()
                guard.observe_loss(loss, n)
            (loss / ga).backward()
        if before_step:
            before_step(i, model)
        if guarded:
            outcomes.append(guard.step())
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
        opt.zero_grad()
    return model, opt, sched, guard, outcomes


def fault_at(step, name=UP, value=math.nan, index=3):
    def inject(i, model):
        if i in ({step} if isinstance(step, int) else set(step)):
            inject_nonfinite_grad(model, name, value, index)
    return inject


def not_applied(outcomes):
    return [(o.step, o.reason.value if o.reason else None) for o in outcomes if not o.applied]


# ---- cases 1 and 4 -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["foreach", "fused"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_case1_case4_nonfinite_grad_is_skipped_and_leaves_no_trace(kind, value):
    # Fault: NaN/+inf/-inf in one element of an MLP weight's grad at steps 2 and 5 of 7.
    # Must: both skipped; state equals the control that never saw batches 2 and 5;
    # AdamW state['step'] == n - k = 5 for foreach and fused AdamW.
    m, o, s, g, outs = run(7, kind=kind, before_step=fault_at({2, 5}, value=value))
    assert not_applied(outs) == [(2, "nonfinite_grad"), (5, "nonfinite_grad")]
    cm, co, cs, _, _ = run(7, guarded=False, kind=kind, drop={2, 5})
    assert_same_state(m, cm, o, co, s, cs)
    assert all(int(st["step"]) == 5 for st in o.state.values())
    assert s.last_epoch == 5 and g.counters["skipped"] == 2


# ---- case 2 ------------------------------------------------------------------------------------
class PositionModel(torch.nn.Module):
    """Tiny Llama plus the awkward parameter kinds: a 1-element scale, a parameter whose grad
    is non-contiguous, and a bf16 parameter (a second dtype group)."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_llama()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.mix = torch.nn.Parameter(torch.randn(VOCAB, 8).t().mul(0.01))  # (8, V), transposed
        self.bias_bf16 = torch.nn.Parameter(torch.zeros(VOCAB, dtype=torch.bfloat16))

    def forward(self, input_ids, labels):
        logits = self.lm(input_ids=input_ids).logits * self.scale
        logits = logits + logits[..., :8] @ self.mix + self.bias_bf16.float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))


@pytest.mark.parametrize("name", ["lm.model.embed_tokens.weight", "bias_bf16", "scale", "mix"])
def test_case2_every_position_class_is_caught(name):
    # Fault: NaN in the first parameter (fp32 group), the last (the bf16 group), a 1-element
    # parameter, a non-contiguous grad. Must: skipped; equals the control.
    def loss_fn(model, ids, labels):
        return model(ids, ids)

    def inject(i, model):
        if name == "mix":
            assert not model.mix.grad.is_contiguous()
        if i == 3:
            inject_nonfinite_grad(model, name, math.nan, index=0 if name == "scale" else 5)

    m, o, s, g, outs = run(5, model=PositionModel(), loss_fn=loss_fn, before_step=inject)
    assert not_applied(outs) == [(3, "nonfinite_grad")]
    assert len(g._grad_stats.groups) == 2  # fp32 and bf16 groups
    cm, co, cs, _, _ = run(5, guarded=False, model=PositionModel(), loss_fn=loss_fn, drop={3})
    assert_same_state(m, cm, o, co, s, cs)


def test_case2_lora_adapters_on_a_frozen_base():
    # Fault: NaN in a LoRA B matrix's grad at step 2 (base frozen, adapters trainable).
    # Must: skipped; adapters and their optimizer state equal the control; base untouched.
    from peft import LoraConfig, get_peft_model

    def lora():
        torch.manual_seed(0)
        return get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    name = next(n for n, p in lora().named_parameters() if "lora_B" in n)
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    m = lora()
    base_before = {n: p.clone() for n, p in m.named_parameters() if not p.requires_grad}
    m, o, s, g, outs = run(4, model=m, opt=adamw(trainable(m)),
                           before_step=fault_at(2, name=name, index=7))
    assert not_applied(outs) == [(2, "nonfinite_grad")]
    assert len(g._grad_stats.params) == len(trainable(m))  # only the adapters are checked
    c = lora()
    cm, co, cs, _, _ = run(4, guarded=False, model=c, opt=adamw(trainable(c)), drop={2})
    assert_same_state(m, cm, o, co, s, cs)
    assert all(torch.equal(p, base_before[n]) for n, p in m.named_parameters() if n in base_before)


# ---- case 3 ------------------------------------------------------------------------------------
def test_case3_decides_on_the_preclip_norm_and_clips_exactly_like_torch():
    # Fault: NaN grad at step 3 with max_grad_norm=0.5 (clipping active on clean steps).
    # Must: decided on the pre-clip norm (reported = torch's get_total_norm before clipping);
    # no NaN residue on later steps; equals a control clipped by torch's clip_grad_norm_.
    seen = {}

    def record(i, model):
        fault_at(3)(i, model)
        seen[i] = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()

    m, o, s, _, outs = run(6, clip=0.5, before_step=record)
    assert not_applied(outs) == [(3, "nonfinite_grad")]
    for out in outs:
        if out.applied:
            assert out.grad_norm == seen[out.step] and out.grad_norm > 0.5 and out.clipped
        else:
            assert math.isnan(out.grad_norm)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    cm, co, cs, _, _ = run(6, guarded=False, clip=0.5, drop={3})
    assert_same_state(m, cm, o, co, s, cs)


# ---- case 5 ------------------------------------------------------------------------------------
def test_case5_grad_accumulation_nan_in_micro_batch_two_skips_the_whole_step():
    # Fault: GA=4, NaN written into a grad during micro-batch 2 of step 3 only (backward #10).
    # Must: the whole step is skipped; one host sync per optimizer step in the guard's work.
    model = tiny_llama()
    fault = GradFault(model, UP, math.nan, index=1, at={2 * 4 + 2})
    m, o, s, _, outs = run(4, ga=4, model=model)
    fault.remove()
    assert fault.fired == [10]
    assert not_applied(outs) == [(3, "nonfinite_grad")]
    cm, co, cs, _, _ = run(4, guarded=False, ga=4, drop={3})
    assert_same_state(m, cm, o, co, s, cs)


@pytest.mark.parametrize("ga, layers", [(1, 1), (4, 1), (4, 3)])
def test_one_host_sync_per_step_whatever_ga_and_parameter_count(ga, layers):
    # Must: the guard's own work (observe_loss on every micro-batch + check) reads the device
    # exactly once per optimizer step, for 1 or 4 micro-batches and 12 or 30 parameters, on
    # clean steps and on a NaN step alike.
    model = tiny_llama(layers)
    guard = Guard(model, adamw(model.parameters()), GuardConfig(max_grad_norm=1.0))
    per_step = []
    for i in range(4):
        syncs = 0
        for mb in range(ga):
            loss = mb_loss(model, DATA[i, mb])
            with count_host_syncs() as c:
                guard.observe_loss(loss, 60)
            syncs += c.count
            loss.backward()
        if i == 2:
            inject_nonfinite_grad(model, UP, math.nan)
        with count_host_syncs() as c:
            out = guard.decide_and_prepare()
        syncs += c.count
        if out.applied:
            guard.optimizer.step()
        guard.optimizer.zero_grad()
        per_step.append(syncs)
    assert per_step == [1, 1, 1, 1], per_step
    assert guard.counters["skipped"] == 1


# ---- cases 6 and 7 -----------------------------------------------------------------------------
def _safe_loss(window_tokens):
    def loss_fn(model, ids, labels):
        return causal_lm_loss(model(input_ids=ids).logits, labels, window_tokens)
    return loss_fn


def test_case6_empty_micro_batch_adds_zero_not_nan():
    # Fault: micro-batch 2 of a GA=3 window has all labels -100. Must: no NaN; the gradient
    # equals the token-weighted reference computed without that micro-batch (torch.equal);
    # counted as an empty micro-batch, not a fault.
    ids = DATA[0, :3]
    labels = ids.clone()
    labels[1] = -100
    n_window = labels[:, :, 1:].ne(-100).sum()

    model = tiny_llama()
    guard = Guard(model, adamw(model.parameters()))
    for mb in range(3):
        loss = causal_lm_loss(model(input_ids=ids[mb]).logits, labels[mb], n_window)
        guard.observe_loss(loss, labels[mb, :, 1:].ne(-100).sum(), window_normalized=True)
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]

    ref = tiny_llama()
    for mb in (0, 2):
        causal_lm_loss(ref(input_ids=ids[mb]).logits, labels[mb], n_window).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, ref.parameters(), strict=True))
    out = guard.decide_and_prepare()
    assert out.applied and out.reason is None and out.empty_micro_batches == 1
    assert out.tokens == int(n_window) and math.isfinite(out.loss)


@pytest.mark.parametrize("loss_kind", ["safe", "transformers"])
def test_case7_window_without_tokens_is_skipped_as_no_valid_tokens(loss_kind):
    # Fault: every label of step 3 is -100 (the safe loss gives exact 0; transformers' mean
    # gives 0/0 = NaN). Must: skipped as no_valid_tokens either way; equals the control.
    def labels(i, m, ids):
        return torch.full_like(ids, -100) if i == 3 else ids

    loss_fn = _safe_loss(None) if loss_kind == "safe" else mb_loss
    m, o, s, g, outs = run(5, labels=labels, loss_fn=loss_fn)
    assert not_applied(outs) == [(3, "no_valid_tokens")]
    assert outs[2].tokens == 0 and g.counters["no_valid_tokens"] == 1
    cm, co, cs, _, _ = run(5, guarded=False, labels=labels, loss_fn=loss_fn, drop={3})
    assert_same_state(m, cm, o, co, s, cs)


# ---- case 8 ------------------------------------------------------------------------------------
def test_case8_nonfinite_loss_vs_nonfinite_grad():
    # Fault: step 2 reports a NaN loss while its gradients are finite (e.g. a logged term that
    # overflowed); step 4 has a finite loss and a NaN gradient. Must: two different reasons,
    # both skipped.
    model = tiny_llama()
    opt = adamw(model.parameters())
    guard = Guard(model, opt)
    reasons = []
    for i in range(1, 5):
        loss = mb_loss(model, DATA[i, 0])
        shown = loss.detach() + (math.nan if i == 2 else 0.0)
        guard.observe_loss(shown)
        loss.backward()
        if i == 4:
            inject_nonfinite_grad(model, UP, math.nan)
        reasons.append(guard.step().reason)
        opt.zero_grad()
    assert reasons == [None, Reason.NONFINITE_LOSS, None, Reason.NONFINITE_GRAD]
    assert guard.counters["nonfinite_loss"] == 1 and guard.counters["nonfinite_grad"] == 1


# ---- case 9 ------------------------------------------------------------------------------------
def test_case9_spike_is_acted_on_and_a_nan_does_not_poison_the_detector():
    # Fault: 30 clean steps, a 100x loss (and so 100x gradients) at step 31, clean again, a NaN
    # gradient at step 36, clean to 40. Must: only 31 (loss_spike) and 36 (nonfinite_grad) are
    # not applied; no clean step is flagged; the windows hold only finite values; equals the
    # control without batches 31 and 36.
    cfg = GuardConfig(spike_window=20, spike_warmup=10)

    def loss_fn(model, ids, labels):
        loss = mb_loss(model, ids)
        loss_fn.calls += 1
        return loss * 100 if loss_fn.calls == 31 else loss

    loss_fn.calls = 0
    m, o, s, g, outs = run(40, cfg=cfg, loss_fn=loss_fn, before_step=fault_at(36))
    assert [(o_.step, o_.reason.value) for o_ in outs if o_.reason] == [
        (31, "loss_spike"), (36, "nonfinite_grad")]
    assert outs[30].detail["direction"] == "high" and outs[30].detail["z"] > 100
    assert all(math.isfinite(v) for v in g.signals.loss.values)
    assert max(g.signals.loss.values) < 10 and max(g.signals.grad.values) < 10
    assert len(g.signals.loss.values) == 20
    cm, co, cs, _, _ = run(40, guarded=False, drop={31, 36})
    assert_same_state(m, cm, o, co, s, cs)


# ---- case 10 -----------------------------------------------------------------------------------
def test_case10_consecutive_nan_halts_with_a_diagnosis_and_writes_events(tmp_path):
    # Fault: NaN grads on steps 3, 4, 5, 6 (K+1 = 4 with max_consecutive_skips=3). Must:
    # NonFiniteHalt at step 6 carrying the diagnosis; 4 strict-JSON events; state equals the
    # control that stopped after step 2.
    cfg = GuardConfig(max_consecutive_skips=3)
    with pytest.raises(NonFiniteHalt) as err:
        run(8, cfg=cfg, before_step=fault_at(range(3, 9)),
            guard_kwargs={"output_dir": tmp_path})
    diag = err.value.diagnosis
    assert diag["step"] == 6 and diag["reason"] == "nonfinite_grad"
    assert diag["consecutive_skips"] == 4 and diag["last_good_step"] == 2
    assert "learning rate" in diag["advice"] and "step 6" in str(err.value)
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    events = [json.loads(x, parse_constant=_reject) for x in lines]
    assert [(e["step"], e["action"]) for e in events] == [
        (3, "skip"), (4, "skip"), (5, "skip"), (6, "halt")]
    assert events[0]["grad_norm"] is None and events[0]["grad_norm_nonfinite"] == "nan"


def test_case10_rollback_policy_halts_when_rollbacks_run_out():
    # Fault: NaN on every step from 3. Must: rollback at 3 and 4 (max_rollbacks=2), halt at 5.
    cfg = GuardConfig(policy="rollback", max_rollbacks=2, max_consecutive_skips=10)
    model = tiny_llama()
    opt = adamw(model.parameters())
    guard = Guard(model, opt, cfg)
    actions = []
    with pytest.raises(NonFiniteHalt):
        for i in range(1, 9):
            mb_loss(model, DATA[i - 1, 0]).backward()
            if i >= 3:
                inject_nonfinite_grad(model, UP, math.nan)
            actions.append(Action.HALT)
            actions[-1] = guard.step().action
            opt.zero_grad()
    assert actions[:4] == [Action.APPLY, Action.APPLY, Action.ROLLBACK, Action.ROLLBACK]
    assert guard.counters["rollbacks"] == 2 and guard.lr_scale == 0.25


def _reject(name):
    raise ValueError(f"non-strict JSON token {name}")


def test_event_line_and_single_warning_per_event(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="finitetune.guard")
    run(4, before_step=fault_at(2), guard_kwargs={"output_dir": tmp_path})
    warnings = [r for r in caplog.records if r.name == "finitetune.guard"]
    assert len(warnings) == 1 and "step 2 skipped (nonfinite_grad)" in warnings[0].getMessage()
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 1


# ---- case 11 -----------------------------------------------------------------------------------
def test_case11_huge_finite_grads_are_norm_overflow_not_nan():
    # Fault (a): one grad element 1e30, finite, whose square overflows fp32 inside its tensor's
    # norm. Fault (b): 1e19 in four different tensors: each norm is finite, the squared total
    # (4e38) is not. Fault (c): a real +inf. Must: (a) and (b) norm_overflow with the true,
    # finite norm; (c) nonfinite_grad. Host syncs: 1 for (b); (a) and (c) take the fault-only
    # probe that tells inf elements from overflow (2).
    model = tiny_llama()
    opt = adamw(model.parameters())
    guard = Guard(model, opt)
    names = [n for n, _ in model.named_parameters()][:4]
    results = []
    for fault in ("a", "b", "c"):
        mb_loss(model, DATA[0, 0]).backward()
        if fault == "a":
            inject_nonfinite_grad(model, UP, 1e30)
        elif fault == "b":
            for n in names:
                inject_nonfinite_grad(model, n, 1e19)
        else:
            inject_nonfinite_grad(model, UP, math.inf)
        with count_host_syncs() as c:
            out = guard.decide_and_prepare()
        results.append((out.reason, c.count))
        if fault == "a":
            assert out.grad_norm == pytest.approx(1e30, rel=1e-6)
        if fault == "b":
            assert out.grad_norm == pytest.approx(2e19, rel=1e-6)
        opt.zero_grad()
    assert results == [(Reason.NORM_OVERFLOW, 2), (Reason.NORM_OVERFLOW, 1),
                       (Reason.NONFINITE_GRAD, 2)]


# ---- case 12 -----------------------------------------------------------------------------------
def test_case12_nan_in_one_param_group_skips_the_whole_step():
    # Fault: NaN only in a norm weight, which sits in the no-decay group of a 2-group AdamW.
    # Must: the whole step is skipped (both groups untouched); equals the control.
    def two_groups(model):
        decay = [p for n, p in model.named_parameters() if "norm" not in n]
        no_decay = [p for n, p in model.named_parameters() if "norm" in n]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)

    a, b = tiny_llama(), tiny_llama()
    m, o, s, _, outs = run(5, model=a, opt=two_groups(a), before_step=fault_at(2, name=NORM))
    assert not_applied(outs) == [(2, "nonfinite_grad")]
    cm, co, cs, _, _ = run(5, guarded=False, model=b, opt=two_groups(b), drop={2})
    assert_same_state(m, cm, o, co, s, cs)


# ---- case 14 -----------------------------------------------------------------------------------
def test_case14_resume_from_a_checkpoint_after_a_skip(tmp_path):
    # Fault: NaN at step 3; checkpoint (model, optimizer, scheduler, guard state as strict JSON)
    # after step 5; fresh objects resume to step 8. Must: identical to the uninterrupted run,
    # guard counters and spike windows included.
    cfg = GuardConfig(spike_warmup=2, spike_window=4)
    full_m, full_o, full_s, full_g, _ = run(8, cfg=cfg, before_step=fault_at(3))

    m, o, s, g, _ = run(5, cfg=cfg, before_step=fault_at(3))
    torch.save({"model": m.state_dict(), "opt": o.state_dict(), "sched": s.state_dict()},
               tmp_path / "ckpt.pt")
    (tmp_path / "guard.json").write_text(json.dumps(g.state_dict(), allow_nan=False))

    ckpt = torch.load(tmp_path / "ckpt.pt")
    m2 = tiny_llama(seed=99)
    m2.load_state_dict(ckpt["model"])
    o2 = adamw(m2.parameters())
    s2 = linear_decay(o2)  # create both, then load both (as the Trainer does)
    o2.load_state_dict(ckpt["opt"])
    s2.load_state_dict(ckpt["sched"])
    g2 = Guard(m2, o2, cfg, scheduler=s2)
    g2.load_state_dict(json.loads((tmp_path / "guard.json").read_text()))
    for i in range(6, 9):
        loss = mb_loss(m2, DATA[i - 1, 0])
        g2.observe_loss(loss)
        loss.backward()
        g2.step()
        o2.zero_grad()
    assert_same_state(full_m, m2, full_o, o2, full_s, s2)
    assert g2.state_dict() == full_g.state_dict()


# ---- case 15 -----------------------------------------------------------------------------------
def test_case15_rollback_equals_a_fresh_run_from_the_last_good_state():
    # Fault: a 100x loss spike at step 7 with spike_action=rollback, snapshot_every=3
    # (snapshots before steps 1, 4, 7... only of states that produced clean steps).
    # Must: the run equals a fresh run that trains steps 1-3 (the state the snapshot before
    # step 4 held), halves the LR, then trains on batches 8-10.
    cfg = GuardConfig(spike_action="rollback", snapshot_every=3, spike_warmup=3, spike_window=10)

    def loss_fn(model, ids, labels):
        loss_fn.calls += 1
        loss = mb_loss(model, ids)
        return loss * 100 if loss_fn.calls == 7 else loss

    loss_fn.calls = 0
    model = tiny_llama()
    opt = adamw(model.parameters())
    guard = Guard(model, opt, cfg)
    for i in range(1, 11):
        loss = loss_fn(model, DATA[i - 1, 0], None)
        guard.observe_loss(loss)
        loss.backward()
        out = guard.step()
        opt.zero_grad()
        if i == 7:
            assert (out.action, out.reason) == (Action.ROLLBACK, Reason.LOSS_SPIKE)
            assert guard.last_good_step == 4
    fresh = tiny_llama()
    fopt = adamw(fresh.parameters())
    for i in list(range(1, 4)) + list(range(8, 11)):
        if i == 8:
            for group in fopt.param_groups:
                group["lr"] *= 0.5
        mb_loss(fresh, DATA[i - 1, 0]).backward()
        fopt.step()
        fopt.zero_grad()
    assert_same_state(model, fresh, opt, fopt)


def test_case15_a_poisoned_state_is_never_kept_as_good():
    # Fault: right after step 4 is applied, a weight is set to NaN (an update that poisoned the
    # model while its own gradients looked fine). Step 5's loss and grads are NaN. Must: the
    # rollback restores the state before step 4 (the last state that produced a clean step),
    # all finite, equal to a control that trained steps 1-3.
    cfg = GuardConfig(policy="rollback", snapshot_every=1)
    model = tiny_llama()
    opt = adamw(model.parameters())
    seen = []

    def on_fault(outcome):  # the attribution hook: sees the state as it was at the fault
        seen.append(bool(torch.isnan(dict(model.named_parameters())[UP]).any()))
        return {"first_bad_param": UP}

    guard = Guard(model, opt, cfg, on_fault=on_fault)
    for i in range(1, 6):
        loss = mb_loss(model, DATA[i - 1, 0])
        guard.observe_loss(loss)
        loss.backward()
        out = guard.step()
        opt.zero_grad()
        if i == 4:
            with torch.no_grad():
                dict(model.named_parameters())[UP][0, 0] = math.nan
    assert (out.action, out.reason) == (Action.ROLLBACK, Reason.NONFINITE_GRAD)
    assert guard.last_good_step == 4 and seen == [True]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    control = tiny_llama()
    copt = adamw(control.parameters())
    for i in range(1, 4):
        mb_loss(control, DATA[i - 1, 0]).backward()
        copt.step()
        copt.zero_grad()
    for group in copt.param_groups:
        group["lr"] *= 0.5
    assert_same_state(model, control, opt, copt)


# ---- fp16 GradScaler ---------------------------------------------------------------------------
def test_grad_scaler_overflow_is_counted_as_calibration_not_fault():
    # Fault: an inf grad under a GradScaler. Must: skipped as scaler_overflow, the scale halves
    # (scaler.update ran), not counted as a non-finite fault; the next step is applied.
    model = tiny_llama()
    opt = adamw(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = Guard(model, opt, GuardConfig(max_grad_norm=1.0), scaler=scaler)
    actions = []
    for i in range(1, 4):
        scaler.scale(mb_loss(model, DATA[i, 0])).backward()
        if i == 2:
            inject_nonfinite_grad(model, UP, math.inf)
        actions.append((guard.step().reason, scaler.get_scale()))
        opt.zero_grad()
    assert actions == [(None, 1024.0), (Reason.SCALER_OVERFLOW, 512.0), (None, 512.0)]
    assert guard.counters["nonfinite"] == 0 and guard.counters["scaler_overflows"] == 1


# ---- low-side alarms -----------------------------------------------------------------------------
def test_low_side_alarms_zero_loss_and_pinned_grad_norm(tmp_path):
    # Fault: a loss that is exactly 0.0 every step, and gradients that never change (a loss
    # linear in the weights). Must: each raises one warning event when its patience is reached,
    # the steps are still applied.
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)
    cfg = GuardConfig(zero_loss_patience=3, pinned_norm_patience=5)
    guard = Guard(None, opt, cfg, output_dir=tmp_path)
    outs = []
    for _ in range(7):
        (w * torch.arange(4.0)).sum().backward()
        guard.observe_loss(0.0, 10)
        outs.append(guard.step())
        opt.zero_grad()
    assert all(o.applied for o in outs)
    assert [(o.step, o.reason.value) for o in outs if o.reason] == [
        (3, "zero_loss"), (6, "pinned_grad_norm")]  # 5 repeats of the first norm
    assert guard.counters["warnings"] == 2
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 2

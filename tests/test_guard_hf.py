"""``GuardCallback`` on a real ``transformers.Trainer`` (and TRL's ``SFTTrainer``): each fault
injected mid-run, and what must hold afterwards.

Each test injects a fault at a known step with the hooks of ``finitetune.testing`` (they count
backward passes, so with GA=1 the pass number is the step number) and compares against a
control: the *unguarded* Trainer, same seed and arguments, on the data without the bad step's
rows (``train_sampling_strategy="sequential"`` so dropping rows shifts nothing else).
Equality is ``torch.equal`` on every parameter and optimizer-state entry; on clean steps the
guard's clipping is bit-identical to the Trainer's, so the comparison holds with clipping on.
"""

import json
import math

import pytest
import torch
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from finitetune import GuardCallback, GuardConfig, NonFiniteHalt
from finitetune.integrations.hf.callback import guard_of
from finitetune.loss.causal import causal_lm_loss
from finitetune.testing import GradFault, LossScale, assert_same_state, count_host_syncs
from finitetune.testing import models as testing_models

VOCAB, SEQ, BS = 64, 16, 2
ROWS = torch.randint(0, VOCAB, (120, SEQ), generator=torch.Generator().manual_seed(7))
UP = "model.layers.0.mlp.up_proj.weight"
NORM = "model.layers.0.post_attention_layernorm.weight"  # in the no-weight-decay group


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama() -> LlamaForCausalLM:
    return testing_models.tiny_llama(vocab=VOCAB, kv_heads=2, positions=SEQ)


def dataset(steps, *, drop=(), ga=1, empty=()):
    """Rows for ``steps`` optimizer steps; rows of steps in ``drop`` are left out; row indices
    in ``empty`` get all labels -100."""
    per_step = BS * ga
    rows = []
    for i in range(steps * per_step):
        if i // per_step + 1 in drop:
            continue
        labels = torch.full((SEQ,), -100) if i in empty else ROWS[i]
        rows.append({"input_ids": ROWS[i], "labels": labels})
    return rows


def trainer(tmp_path, steps, *, guard=None, data=None, ga=1, model=None, trainer_cls=Trainer,
            args_cls=TrainingArguments, callbacks=(), **kw):
    args = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=BS,
                gradient_accumulation_steps=ga, learning_rate=1e-2, lr_scheduler_type="constant",
                weight_decay=0.1, max_grad_norm=1.0, optim="adamw_torch_fused", logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                train_sampling_strategy="sequential", seed=0)
    extra = {k: kw.pop(k) for k in list(kw) if k in ("optimizers", "compute_loss_func",
                                                     "processing_class", "peft_config")}
    args.update(kw)
    cbs = list(callbacks) + ([guard] if guard is not None else [])
    return trainer_cls(model=model or tiny_llama(), args=args_cls(**args),
                       train_dataset=data if data is not None else dataset(steps, ga=ga),
                       callbacks=cbs, **extra)


def logged(t, key):
    return {h["step"]: h[key] for h in t.state.log_history if key in h}


def events(tmp_path):
    path = tmp_path / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# ---- cases 1, 3, 4, 12 ---------------------------------------------------------------------------
def test_skip_equals_the_unguarded_trainer_without_the_bad_batch(tmp_path):
    # Fault: NaN in a layer-norm weight's grad (no-decay group of the Trainer's 2-group fused
    # AdamW) at step 3 of 6, max_grad_norm=1.0 active. Must: skipped (not stepped with zeroed
    # grads); equal to the unguarded Trainer without batch 3; grad_norm logged pre-clip (NaN at
    # 3, > 1.0 elsewhere); global_step 6, optimizer step 5, scheduler 5; counters in the logs.
    t = trainer(tmp_path / "g", 6, guard=GuardCallback())
    GradFault(t.model, NORM, math.nan, index=2, at={3})
    t.train()
    c = trainer(tmp_path / "c", 5, data=dataset(6, drop={3}))
    c.train()
    assert_same_state(t.model, c.model, t.optimizer, c.optimizer, t.lr_scheduler, c.lr_scheduler)
    assert len(t.optimizer.param_groups) == 2
    assert t.state.global_step == 6 and t.lr_scheduler.last_epoch == 5
    assert all(int(s["step"]) == 5 for s in t.optimizer.state.values())
    norms = logged(t, "grad_norm")
    assert math.isnan(norms[3]) and all(norms[s] > 1.0 for s in (1, 2, 4, 5, 6))
    assert logged(t, "guard/skipped") == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1}
    assert logged(t, "guard/nonfinite")[6] == 1
    assert [(e["step"], e["reason"]) for e in events(tmp_path / "g")] == [(3, "nonfinite_grad")]
    assert "_clip_grad_norm" not in t.__dict__  # patches removed after train()


def test_scheduler_does_not_advance_on_a_skip_unless_asked(tmp_path):
    # Fault: NaN at step 2, foreach AdamW + a linear schedule of fixed length passed in.
    # Must: equal to the control including the scheduler (it did not advance on the skip);
    # with scheduler_on_skip=True it advances on every step.
    def opt_sched(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 50)

    m = tiny_llama()
    t = trainer(tmp_path / "g", 5, guard=GuardCallback(), model=m, optimizers=opt_sched(m))
    GradFault(t.model, UP, math.nan, at={2})
    t.train()
    cm = tiny_llama()
    c = trainer(tmp_path / "c", 4, data=dataset(5, drop={2}), model=cm, optimizers=opt_sched(cm))
    c.train()
    assert_same_state(t.model, c.model, t.optimizer, c.optimizer, t.lr_scheduler, c.lr_scheduler)
    assert t.lr_scheduler.last_epoch == 4

    m2 = tiny_llama()
    t2 = trainer(tmp_path / "g2", 5, guard=GuardCallback(GuardConfig(scheduler_on_skip=True)),
                 model=m2, optimizers=opt_sched(m2))
    GradFault(t2.model, UP, math.nan, at={2})
    t2.train()
    assert t2.lr_scheduler.last_epoch == 5


# ---- case 5 and the host-sync contract --------------------------------------------------------
def test_case5_gradient_accumulation_nan_in_micro_batch_two(tmp_path):
    # Fault: GA=4, NaN written during micro-batch 2 of step 2 (backward #6). Must: whole step
    # skipped; equal to the control without step 2's four micro-batches.
    t = trainer(tmp_path / "g", 3, guard=GuardCallback(), ga=4)
    fault = GradFault(t.model, UP, math.nan, at={6})
    t.train()
    assert fault.fired == [6]
    c = trainer(tmp_path / "c", 2, ga=4, data=dataset(3, ga=4, drop={2}))
    c.train()
    assert_same_state(t.model, c.model, t.optimizer, c.optimizer, t.lr_scheduler, c.lr_scheduler)
    assert [(e["step"], e["micro_batches"]) for e in events(tmp_path / "g")] == [(2, 4)]


@pytest.mark.parametrize("ga", [1, 4])
def test_guard_adds_at_most_one_host_sync_per_optimizer_step(tmp_path, ga):
    # Must: everything the callback does (wrapped training_step on every micro-batch, the
    # check, the wrapped optimizer step) adds exactly one host read per optimizer step to the
    # Trainer's own, whatever the accumulation. (No logging inside the run: logging would
    # *save* the Trainer's grad_norm .item(), since the guard hands it a host float.)
    counts = {}
    for name, guard in (("plain", None), ("guarded", GuardCallback())):
        t = trainer(tmp_path / name, 3, guard=guard, ga=ga, logging_steps=1000)
        with count_host_syncs() as c:
            t.train()
        counts[name] = c.count
    assert counts["guarded"] - counts["plain"] == 3, counts


# ---- cases 6 and 7 ------------------------------------------------------------------------------
def test_case6_case7_empty_micro_batch_and_empty_window_with_the_safe_loss(tmp_path):
    # Fault: GA=2 with finitetune's causal_lm_loss; step 2 has one micro-batch whose labels are
    # all -100 (rows 4-5), step 4 has no supervised token at all (rows 12-15). Must: step 2 is
    # applied (no NaN, counted as an empty micro-batch); step 4 skipped as no_valid_tokens;
    # equal to the control without step 4. The log has no loss for step 4 (NaN: not one
    # supervised token, nothing was applied), where the Trainer alone would print 0.0.
    empty_mb, empty_window = {4, 5}, {12, 13, 14, 15}
    t = trainer(tmp_path / "g", 5, guard=GuardCallback(), ga=2, compute_loss_func=causal_lm_loss,
                data=dataset(5, ga=2, empty=empty_mb | empty_window))
    t.train()
    c = trainer(tmp_path / "c", 4, ga=2, compute_loss_func=causal_lm_loss,
                data=dataset(5, ga=2, drop={4}, empty=empty_mb))
    c.train()
    assert_same_state(t.model, c.model, t.optimizer, c.optimizer, t.lr_scheduler, c.lr_scheduler)
    assert [(e["step"], e["reason"]) for e in events(tmp_path / "g")] == [(4, "no_valid_tokens")]
    assert logged(t, "guard/empty_micro_batches")[2] == 1
    assert logged(t, "guard/empty_micro_batches")[5] == 3
    assert logged(t, "guard/no_valid_tokens")[5] == 1
    losses = logged(t, "loss")
    assert math.isnan(losses[4]) and all(math.isfinite(losses[s]) for s in (1, 2, 3, 5))


# ---- cases 8 and 11 ------------------------------------------------------------------------------
def test_case8_case11_loss_grad_and_overflow_faults_are_classified(tmp_path):
    # Faults: step 2: grads 1e30 (finite; squared norm overflows fp32); step 3: the loss value
    # is NaN while gradients are finite; step 5: finite loss, NaN gradient. Must: reasons
    # norm_overflow, nonfinite_loss, nonfinite_grad; equal to the control without 2, 3, 5.
    calls = {"n": 0}

    def loss_with_nan_value(outputs, labels, num_items_in_batch=None):
        calls["n"] += 1
        loss = causal_lm_loss(outputs, labels, num_items_in_batch)
        return loss + torch.tensor(math.nan if calls["n"] == 3 else 0.0)  # value only

    t = trainer(tmp_path / "g", 6, guard=GuardCallback(), compute_loss_func=loss_with_nan_value)
    GradFault(t.model, UP, 1e30, index=5, at={2})
    GradFault(t.model, UP, math.nan, index=5, at={5})
    t.train()
    got = [(e["step"], e["reason"]) for e in events(tmp_path / "g")]
    assert got == [(2, "norm_overflow"), (3, "nonfinite_loss"), (5, "nonfinite_grad")]
    assert events(tmp_path / "g")[0]["grad_norm"] > 1e29  # the true size, not NaN
    c = trainer(tmp_path / "c", 3, compute_loss_func=causal_lm_loss,
                data=dataset(6, drop={2, 3, 5}))
    c.train()
    assert_same_state(t.model, c.model, t.optimizer, c.optimizer, t.lr_scheduler, c.lr_scheduler)


# ---- case 9 --------------------------------------------------------------------------------------
def test_case9_spike_then_nan_only_the_faults_are_acted_on(tmp_path):
    # Fault: 30 clean steps, the model's loss x100 at step 31, clean, NaN grad at step 36,
    # clean to 40. Must: only 31 (loss_spike) and 36 (nonfinite_grad) are skipped; equal to the
    # control without them.
    cfg = GuardConfig(spike_window=20, spike_warmup=10)
    t = trainer(tmp_path / "g", 40, guard=GuardCallback(cfg), logging_steps=10)
    LossScale(t.model, 100.0, at={31})
    GradFault(t.model, UP, math.nan, at={36})
    t.train()
    assert [(e["step"], e["reason"]) for e in events(tmp_path / "g")] == [
        (31, "loss_spike"), (36, "nonfinite_grad")]
    c = trainer(tmp_path / "c", 38, data=dataset(40, drop={31, 36}), logging_steps=10)
    c.train()
    assert_same_state(t.model, c.model, t.optimizer, c.optimizer, t.lr_scheduler, c.lr_scheduler)


# ---- case 10 -------------------------------------------------------------------------------------
class EndRecorder(TrainerCallback):
    ended = False

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = True


def test_case10_halt_stops_cleanly_and_raises_with_a_diagnosis(tmp_path):
    # Fault: NaN on every step from 3 (max_consecutive_skips=2). Must: steps 3, 4 skipped, 5
    # halts; training stops there, other callbacks still get on_train_end, the final metrics
    # are logged, events.jsonl has the 3 events; then train() raises NonFiniteHalt; the model
    # equals the control that trained 2 steps.
    rec = EndRecorder()
    t = trainer(tmp_path / "g", 10, guard=GuardCallback(GuardConfig(max_consecutive_skips=2)),
                callbacks=[rec])
    GradFault(t.model, UP, math.nan, at=range(3, 20))
    with pytest.raises(NonFiniteHalt) as err:
        t.train()
    assert err.value.diagnosis["step"] == 5 and err.value.diagnosis["last_good_step"] == 2
    assert rec.ended and t.state.global_step == 5
    assert "train_runtime" in t.state.log_history[-1]
    assert [(e["step"], e["action"]) for e in events(tmp_path / "g")] == [
        (3, "skip"), (4, "skip"), (5, "halt")]
    c = trainer(tmp_path / "c", 2)
    c.train()
    assert_same_state(t.model, c.model, t.optimizer, c.optimizer, t.lr_scheduler, c.lr_scheduler)


# ---- case 14 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("restore_flag", [False, True])
def test_case14_resume_after_a_skip_matches_the_uninterrupted_run(tmp_path, restore_flag):
    # Fault: NaN at step 3; checkpoint at step 5; a fresh model, Trainer and callback resume
    # from it to step 8 (random sampler: the data position must be restored). Must: model,
    # optimizer, scheduler and guard state equal the uninterrupted run's.
    kw = dict(save_strategy="steps", save_steps=5, train_sampling_strategy="random",
              restore_callback_states_from_checkpoint=restore_flag)
    cfg = GuardConfig(spike_warmup=2, spike_window=4)
    a = trainer(tmp_path / "a", 8, guard=GuardCallback(cfg), data=dataset(10), **kw)
    GradFault(a.model, UP, math.nan, at={3})
    a.train()
    b = trainer(tmp_path / "b", 8, guard=GuardCallback(cfg), data=dataset(10), **kw)
    b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    assert_same_state(a.model, b.model, a.optimizer, b.optimizer, a.lr_scheduler, b.lr_scheduler)
    ga, gb = guard_of(a), guard_of(b)
    assert gb.counters["skipped"] == 1 and gb.state_dict() == ga.state_dict()
    assert logged(b, "guard/skipped")[8] == 1


# ---- case 15 -------------------------------------------------------------------------------------
class StateRecorder(TrainerCallback):
    def __init__(self):
        self.params, self.moments = {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.params[state.global_step] = [p.detach().clone() for p in model.parameters()]
        self.moments[state.global_step] = [
            {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]


def test_case15_rollback_restores_the_last_good_state_and_lowers_the_lr(tmp_path):
    # Fault: NaN at step 5, policy rollback, snapshot_every=2 (snapshots of the states before
    # steps 1, 3: the state after step 2 is the last one that produced a clean step before the
    # fault). Must: after step 5 the parameters and every optimizer-state entry equal those
    # after step 2; the LR is halved from step 6 on.
    rec = StateRecorder()
    cfg = GuardConfig(policy="rollback", snapshot_every=2)
    t = trainer(tmp_path / "g", 7, guard=GuardCallback(cfg), callbacks=[rec])
    GradFault(t.model, UP, math.nan, at={5})
    t.train()
    assert [(e["step"], e["action"]) for e in events(tmp_path / "g")] == [(5, "rollback")]
    for after, before in zip(rec.params[5], rec.params[2], strict=True):
        assert torch.equal(after, before)
    for after, before in zip(rec.moments[5], rec.moments[2], strict=True):
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in after)
    lrs = logged(t, "learning_rate")
    assert lrs[4] == pytest.approx(1e-2) and lrs[6] == pytest.approx(5e-3)
    assert logged(t, "guard/lr_scale")[7] == 0.5 and logged(t, "guard/rollbacks")[7] == 1


# ---- case 2 (LoRA) through TRL's SFTTrainer ----------------------------------------------------
@pytest.mark.parametrize("checkpoint_config", [None, "memory"])
def test_disk_rollback_without_a_disk_checkpoint_callback_stops_before_training(
        tmp_path, checkpoint_config):
    # Fault: rollback_to='disk' with no CheckpointCallback (checkpoints=False turned the one
    # the guard brings off) or one set to 'memory': nothing would keep or restore the
    # checkpoints, so every rollback would silently be a skip. Must: train() refuses before
    # step 1 and says what to add; the parameters are untouched.
    from finitetune.errors import ConfigError
    from finitetune.integrations.hf.checkpoint_callback import CheckpointCallback

    extra = [] if checkpoint_config is None else [
        CheckpointCallback(config=GuardConfig(rollback_to=checkpoint_config))]
    t = trainer(tmp_path, 4, guard=GuardCallback(GuardConfig(policy="rollback",
                                                             rollback_to="disk"),
                                                 checkpoints=False),
                callbacks=extra, save_strategy="steps", save_steps=2)
    before = [p.detach().clone() for p in t.model.parameters()]
    with pytest.raises(ConfigError, match="no CheckpointCallback with rollback_to='disk'"):
        t.train()
    assert t.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters(), strict=True))


def test_sfttrainer_lora_skip_equals_control(tmp_path):
    # Fault: NaN in a LoRA B grad at step 2 of 4, SFTTrainer with a peft LoRA config on a frozen
    # tiny Llama. Must: skipped; adapters and optimizer state equal the unguarded SFTTrainer
    # without batch 2; the frozen base is untouched.
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    vocab = {f"t{i}": i for i in range(VOCAB - 2)} | {"<pad>": VOCAB - 2, "<eos>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="<eos>")

    def sft(name, steps, drop=(), guard=None):
        rows = [r for i, r in enumerate(ROWS[: 4 * BS].clamp(max=VOCAB - 3).tolist())
                if i // BS + 1 not in drop]
        return trainer(
            tmp_path / name, steps, guard=guard, trainer_cls=SFTTrainer, args_cls=SFTConfig,
            data=Dataset.from_dict({"input_ids": rows}), processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), max_length=SEQ,
            packing=False, optim="adamw_torch")

    t = sft("g", 4, guard=GuardCallback())
    base = {n: p.clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    lora_b = next(n for n, p in t.model.named_parameters() if "lora_B" in n)
    GradFault(t.model, lora_b, math.nan, index=3, at={2})
    t.train()
    c = sft("c", 3, drop={2})
    c.train()
    assert [(e["step"], e["reason"]) for e in events(tmp_path / "g")] == [(2, "nonfinite_grad")]
    assert_same_state(t.model, c.model, t.optimizer, c.optimizer, t.lr_scheduler, c.lr_scheduler)
    assert all(torch.equal(p, base[n]) for n, p in t.model.named_parameters() if n in base)


def test_callback_added_after_init_still_skips_and_halts(tmp_path):
    # Fault: NaN at step 2 with max_consecutive_skips=0 (halt on the first fault), callback added
    # with trainer.add_callback after construction (no on_init_end). Must: step 2 not applied,
    # train() raises NonFiniteHalt (from on_train_end this time), the model equals 1 clean step.
    t = trainer(tmp_path / "g", 4)
    t.add_callback(GuardCallback(GuardConfig(max_consecutive_skips=0)))
    GradFault(t.model, UP, math.nan, at={2})
    with pytest.raises(NonFiniteHalt, match="step 2"):
        t.train()
    c = trainer(tmp_path / "c", 1)
    c.train()
    assert_same_state(t.model, c.model, t.optimizer, c.optimizer)

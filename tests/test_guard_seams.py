"""The seams the Trainer integration stands on: explicit, checked at start-up, undone on exit.

Each test makes one seam fail or one exit path happen on a real ``transformers.Trainer`` and
asserts what must hold: a ``ConfigError`` naming the tested versions *before* any step is
applied, the optimizer and scheduler exactly as they were afterwards, a checkpoint-restored
callback still wired to the user's hook and directory, honest logs.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaForCausalLM,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from finitetune import GuardCallback, GuardConfig
from finitetune.errors import ConfigError
from finitetune.integrations.hf import seams
from finitetune.integrations.hf.callback import guard_of, guarded
from finitetune.integrations.hf.mixin import GuardOverrides
from finitetune.integrations.hf.seams import TESTED
from finitetune.testing import GradFault, OutputFault
from finitetune.testing import models as testing_models

VOCAB, SEQ, BS = 64, 16, 2
ROWS = torch.randint(0, VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(5))
UP = "model.layers.0.mlp.up_proj.weight"

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(layers=1) -> LlamaForCausalLM:
    return testing_models.tiny_llama(vocab=VOCAB, layers=layers, kv_heads=2, positions=SEQ)


def args(out, steps, **kw):
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=BS,
                learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=1.0,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                disable_tqdm=True, train_sampling_strategy="sequential", seed=0)
    return TrainingArguments(**(base | kw))


def rows(n=32, empty=()):
    return [{"input_ids": ROWS[i],
             "labels": torch.full((SEQ,), -100) if i in empty else ROWS[i]} for i in range(n)]


def events(path: Path):
    f = path / "events.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class Snapshots(TrainerCallback):
    """Parameters after every step, and the optimizer's / scheduler's own ``step`` attributes
    as they were when training began (this callback runs before the guard's)."""

    def __init__(self):
        self.after = {}

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, model=None,
                       **kw):
        self.optimizer_step = optimizer.__dict__.get("step")
        self.scheduler = lr_scheduler
        self.after[0] = params(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        self.after[state.global_step] = params(model)


# ---- one list, checked at start-up ------------------------------------------------------------
@pytest.fixture
def fresh_checks(monkeypatch):
    """The class-level checks run once per process; a test that breaks a seam runs them anew."""
    monkeypatch.setattr(seams, "_CHECKED", {})


def test_the_guard_overrides_only_public_trainer_methods():
    # Must: the overrides are public Trainer methods; clipping is taken over on the Trainer's
    # Accelerator (a seam every release shares), so no private Trainer method is overridden.
    private = {n for n, v in vars(GuardOverrides).items()
               if n.startswith("_") and not n.startswith("__") and callable(v)
               and not n.startswith("_finitetune")}
    assert private == set()
    assert {"train", "training_step", "log"} <= set(vars(GuardOverrides))


def test_a_removed_clip_seam_is_refused_at_construction(tmp_path, monkeypatch, fresh_checks):
    # Fault: an accelerate release without Accelerator.clip_grad_norm_ (simulated on the class).
    # Must: building the Trainer with a GuardCallback raises ConfigError naming the seam, what it
    # is for and the releases that have it; nothing trained.
    from accelerate import Accelerator

    monkeypatch.delattr(Accelerator, "clip_grad_norm_")
    with pytest.raises(ConfigError) as err:
        Trainer(model=tiny_llama(), args=args(tmp_path, 3), train_dataset=rows(),
                callbacks=[GuardCallback()])
    msg = str(err.value)
    assert "accelerate.Accelerator.clip_grad_norm_(self, parameters, max_norm, norm_type)" in msg
    assert "accelerate 1.3 to 1.16 have it" in msg and "has nothing" in msg
    lo, hi = TESTED["transformers"]
    assert f"transformers {lo} to {hi}" in msg
    assert not (tmp_path / "events.jsonl").exists()


def test_a_re_signed_trainer_seam_is_refused_at_construction(tmp_path, monkeypatch,
                                                             fresh_checks):
    # Fault: a transformers release whose _save_checkpoint takes other parameters. Must:
    # ConfigError at construction quoting the tested and the found signature.
    def _save_checkpoint(self, model):
        return None

    monkeypatch.setattr(Trainer, "_save_checkpoint", _save_checkpoint)
    with pytest.raises(ConfigError, match=r"_save_checkpoint\(self, model, trial\).*has "
                                          r"\(self, model\)"):
        Trainer(model=tiny_llama(), args=args(tmp_path, 2), train_dataset=rows(),
                callbacks=[GuardCallback()])


def test_a_newer_release_is_tried_not_refused(tmp_path, monkeypatch, fresh_checks, capsys):
    # Fault: the installed transformers is newer than the newest tested one (simulated by
    # lowering the tested range). Must: every seam is present, so training goes on with one
    # line naming the newest tested release, and the guard works (a NaN step is skipped).
    monkeypatch.setitem(TESTED, "transformers", ("4.0.0", "4.0.0"))
    snap = Snapshots()
    t = Trainer(model=tiny_llama(), args=args(tmp_path, 3), train_dataset=rows(),
                callbacks=[snap, GuardCallback()])
    GradFault(t.model, UP, math.nan, at={2})
    t.train()
    err = capsys.readouterr().err
    assert err.count("is newer than the newest tested release (4.0.0)") == 1
    assert same(snap.after[2], snap.after[1])


HAS_CLIP_METHOD = "_clip_grad_norm" in vars(Trainer)
needs_clip_method = pytest.mark.skipif(
    not HAS_CLIP_METHOD, reason="Trainer._clip_grad_norm exists from transformers 5.3; before, "
    "the Trainer clips inline through the same Accelerator call")


@needs_clip_method
def test_a_subclass_clipping_through_the_trainer_is_guarded(tmp_path):
    # A subclass overrides _clip_grad_norm and calls the Trainer's (releases 5.3+): the clip
    # still goes through the Accelerator, so the guard decides. Fault: NaN at step 2. Must:
    # step 2 skipped, parameters bit-identical.
    calls = []

    class LogsItsClip(Trainer):
        def _clip_grad_norm(self, model):
            calls.append(self.state.global_step)
            return super()._clip_grad_norm(model)

    snap = Snapshots()
    t = LogsItsClip(model=tiny_llama(), args=args(tmp_path, 3), train_dataset=rows(),
                    callbacks=[snap, GuardCallback()])
    GradFault(t.model, UP, math.nan, at={2})
    t.train()
    assert calls == [0, 1, 2] and same(snap.after[2], snap.after[1])


@needs_clip_method
def test_a_subclass_clipping_its_own_way_stops_before_the_step(tmp_path):
    # Fault: a subclass clips with torch directly (not through the Accelerator): the guard was
    # never asked and the norm may have been NaN. Must: ConfigError at the first optimizer step,
    # before it is applied (parameters unchanged, global_step 0).
    class ClipsItself(Trainer):
        def _clip_grad_norm(self, model):
            return torch.nn.utils.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)

    t = ClipsItself(model=tiny_llama(), args=args(tmp_path, 2), train_dataset=rows(),
                    callbacks=[GuardCallback()])
    before = params(t.model)
    with pytest.raises(ConfigError, match="without asking the gradient guard"):
        t.train()
    assert t.state.global_step == 0 and same(params(t.model), before)


def test_an_optimizer_step_the_guard_was_not_asked_about_is_refused(tmp_path):
    # Fault: something steps the optimizer before the Trainer asks for the norm (what a Trainer
    # that clips without the seam would do). Must: ConfigError, the step is not applied.
    class StepsEarly(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            if state.global_step == 1:
                optimizer.step()

    snap = Snapshots()
    t = Trainer(model=tiny_llama(), args=args(tmp_path, 3), train_dataset=rows(),
                callbacks=[snap, StepsEarly(), GuardCallback()])
    with pytest.raises(ConfigError, match="without asking the gradient guard"):
        t.train()
    assert same(params(t.model), snap.after[1])
    assert t.optimizer.__dict__.get("step") is snap.optimizer_step


# ---- exit paths -------------------------------------------------------------------------------
def test_wraps_are_undone_after_an_exception_and_nothing_is_logged_afterwards(tmp_path):
    # Fault: a user callback raises at step 2. Must: the exception propagates; the optimizer's
    # step and trainer.lr_scheduler are the originals again; a later log carries no guard keys.
    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                raise RuntimeError("boom")

    snap = Snapshots()
    t = Trainer(model=tiny_llama(), args=args(tmp_path, 4), train_dataset=rows(),
                callbacks=[snap, Boom(), GuardCallback()])
    with pytest.raises(RuntimeError, match="boom"):
        t.train()
    assert t.optimizer.__dict__.get("step") is snap.optimizer_step
    assert t.lr_scheduler is snap.scheduler
    t.log({"loss": 1.0})
    assert not any(k.startswith("guard/") for k in t.state.log_history[-1])


def test_wraps_are_undone_after_a_halt(tmp_path):
    # Fault: NaN at step 2 with max_consecutive_skips=0 (halt at once). Must: NonFiniteHalt
    # after training stopped; optimizer step and scheduler are the originals again.
    from finitetune import NonFiniteHalt

    snap = Snapshots()
    t = Trainer(model=tiny_llama(), args=args(tmp_path, 4), train_dataset=rows(),
                callbacks=[snap, GuardCallback(GuardConfig(max_consecutive_skips=0))])
    GradFault(t.model, UP, math.nan, at={2})
    with pytest.raises(NonFiniteHalt):
        t.train()
    assert t.state.global_step == 2 and same(params(t.model), snap.after[1])
    assert t.optimizer.__dict__.get("step") is snap.optimizer_step
    assert t.lr_scheduler is snap.scheduler


def test_remove_callback_unguards_the_trainer(tmp_path):
    # Fault: NaN gradient at step 2 after the user removed the GuardCallback. Must: the Trainer
    # trains as plain transformers does (the NaN step is applied, weights go NaN), no events.
    t = Trainer(model=tiny_llama(), args=args(tmp_path, 3), train_dataset=rows(),
                callbacks=[GuardCallback()])
    t.remove_callback(GuardCallback)
    GradFault(t.model, UP, math.nan, at={2})
    t.train()
    assert not all(torch.isfinite(p).all() for p in t.model.parameters())
    assert events(tmp_path) == []
    assert not any(k.startswith("guard/") for h in t.state.log_history for k in h)


class TagHook:
    """A FaultHook that tags the event (and records which guard it serves)."""

    def __init__(self, tag):
        self.tag, self.guard = tag, None

    def bind_guard(self, guard):
        self.guard = guard

    def __call__(self, outcome):
        return {"hook": self.tag, "hook_saw_step": outcome.step}


def test_callback_restored_from_a_checkpoint_keeps_its_hook_and_output_dir(tmp_path):
    # Fault: NaN at step 2 (run a, checkpoint at 3) and at step 5 (run b, resumed from
    # checkpoint-3 with restore_callback_states_from_checkpoint: the Trainer rebuilds the
    # callback from its JSON state). Must: b's step-5 event goes to b's events dir with b's
    # hook fields; the restored guard continues a's counters.
    kw = dict(save_strategy="steps", save_steps=3, restore_callback_states_from_checkpoint=True)
    a = Trainer(model=tiny_llama(), args=args(tmp_path / "a", 5, **kw), train_dataset=rows(),
                callbacks=[GuardCallback(output_dir=tmp_path / "ev_a", on_fault=TagHook("a"))])
    GradFault(a.model, UP, math.nan, at={2})
    a.train()
    hook_b = TagHook("b")
    given = GuardCallback(output_dir=tmp_path / "ev_b", on_fault=hook_b)
    b = Trainer(model=tiny_llama(), args=args(tmp_path / "b", 5, **kw), train_dataset=rows(),
                callbacks=[given])
    GradFault(b.model, UP, math.nan, at={2})  # 2nd backward after the resume = step 5
    b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    restored = b.__dict__["_finitetune_callback"]
    assert restored is not given and restored in b.callback_handler.callbacks  # rebuilt
    assert restored.on_fault is hook_b and hook_b.guard is guard_of(b)
    assert [(e["step"], e["hook"]) for e in events(tmp_path / "ev_b")] == [(5, "b")]
    assert guard_of(b).counters["skipped"] == 2
    assert [(e["step"], e["hook"]) for e in events(tmp_path / "ev_a")] == [(2, "a")]


# ---- every Trainer class ----------------------------------------------------------------------
def test_guarded_seq2seq_trainer_skips_a_nan_step(tmp_path):
    # Fault: NaN in one gradient element at step 2 of a tiny T5 under guarded(Seq2SeqTrainer),
    # no GuardCallback passed. Must: a default guard is added; step 2 leaves every parameter
    # bit-identical; the class is still a Seq2SeqTrainer.
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0))
    data = [{"input_ids": ROWS[i][:8], "labels": ROWS[i][8:]} for i in range(16)]
    snap = Snapshots()
    cls = guarded(Seq2SeqTrainer)
    assert guarded(Seq2SeqTrainer) is cls and guarded(cls) is cls
    t = cls(model=model, args=Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=BS, use_cpu=True,
        report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1),
        train_dataset=data, callbacks=[snap])
    GradFault(t.model, "encoder.block.0.layer.1.DenseReluDense.wi.weight", math.nan, at={2})
    t.train()
    assert isinstance(t, Seq2SeqTrainer)
    assert same(snap.after[2], snap.after[1]) and not same(snap.after[3], snap.after[2])
    assert [(e["step"], e["reason"]) for e in events(tmp_path)] == [(2, "nonfinite_grad")]


# ---- attribution on by default; honest logs ---------------------------------------------------
def test_default_callback_names_the_layer_whose_output_went_inf(tmp_path):
    # Fault: +inf in the output of decoder layer 1 (of 2) during step 2, plain
    # Trainer(callbacks=[GuardCallback()]) (no Attributor built by the user). Must: the event
    # names model.layers.1 as the first non-finite module, with a verdict.
    model = tiny_llama(layers=2)

    class InfInLayer1AtStep2(TrainerCallback):
        handle = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                self.handle = OutputFault(model.model.layers[1], math.inf)

        def on_step_end(self, args, state, control, **kw):
            if self.handle is not None:
                self.handle = self.handle.remove()

    Trainer(model=model, args=args(tmp_path, 3), train_dataset=rows(),
            callbacks=[InfInLayer1AtStep2(), GuardCallback()]).train()
    (ev,) = events(tmp_path)
    assert ev["step"] == 2 and ev["action"] == "skip"
    assert ev["first_nonfinite_module"] == "model.layers.1"
    assert ev["verdict"] == "data_or_model" and ev["suggestion"]


def test_a_nan_loss_is_never_logged_as_zero(tmp_path):
    # Fault: step 2's batch has every label -100 and the model's own loss (0/0 = NaN).
    # Unguarded, the Trainer logs loss 0.0 for it (its NaN filter): the seed's pattern. Must,
    # guarded: step 2 logs NaN (no step applied, no token to learn from), the other steps their
    # loss, and train_loss is the mean of the applied steps, finite.
    data = rows(8, empty={2, 3})
    plain = Trainer(model=tiny_llama(), args=args(tmp_path / "p", 4), train_dataset=data)
    plain.train()
    assert {h["step"]: h["loss"] for h in plain.state.log_history if "loss" in h}[2] == 0.0
    t = Trainer(model=tiny_llama(), args=args(tmp_path / "g", 4), train_dataset=data,
                callbacks=[GuardCallback()])
    t.train()
    losses = {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}
    assert math.isnan(losses[2]) and all(math.isfinite(losses[s]) for s in (1, 3, 4))
    assert [(e["step"], e["reason"]) for e in events(tmp_path / "g")] == [(2, "no_valid_tokens")]
    summary = t.state.log_history[-1]
    assert summary["train_loss"] == pytest.approx((losses[1] + losses[3] + losses[4]) / 3,
                                                  abs=1e-3)


def test_two_guard_callbacks_on_one_trainer_are_refused(tmp_path):
    # Must: two guards on one Trainer (double wrapping) are refused before any step.
    t = Trainer(model=tiny_llama(), args=args(tmp_path, 2), train_dataset=rows(),
                callbacks=[GuardCallback(), GuardCallback(GuardConfig(policy="halt"))])
    with pytest.raises(ConfigError, match="more than one GuardCallback"):
        t.train()
    assert t.state.global_step == 0


def test_no_stack_inspection_and_no_accelerate_private_writes():
    # Must: no code path walks the call stack or writes accelerate's private overflow flag.
    src = Path(__file__).resolve().parents[1] / "src" / "finitetune"
    text = {p: p.read_text() for p in src.rglob("*.py")}
    for needle in ("currentframe", "f_back", "_getframe", "_is_overflow"):
        assert not [str(p) for p, t in text.items() if needle in t], needle


def test_declared_ranges_are_the_tested_ones():
    # Must: pyproject's lower bounds are the oldest releases the matrix tests (TESTED), and no
    # dependency is capped (a newer release is tried, not refused). Nothing here compares the
    # installed release with a pin.
    import re

    deps = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for name in ("transformers", "accelerate", "peft"):
        assert f'"{name}>={TESTED[name][0]}"' in deps, name
    assert f'"trl>={TESTED["trl"][0]}"' in deps
    assert not re.findall(r'"(?:torch|transformers|trl|peft|accelerate|datasets)[^"]*<', deps)


class AsksNothing(Trainer):
    """Releases before 5.3 with max_grad_norm 0 compute no norm at all: no clip call."""

    def _get_grad_norm(self, model, grad_norm=None):
        return grad_norm


@pytest.mark.parametrize("trainer_cls", [Trainer, AsksNothing], ids=["asks", "asks_nothing"])
def test_without_clipping_the_guard_still_decides(tmp_path, trainer_cls):
    # Fault: NaN at step 2 with max_grad_norm=0. From 5.3 the Trainer asks its Accelerator for
    # the norm (max_norm=inf): the guard decides there and the logged grad_norm is its pre-clip
    # norm (NaN at 2). A Trainer that asks nothing (before 5.3, simulated) gets the decision at
    # the optimizer's step. Must, both: step 2 skipped with parameters bit-identical, one event,
    # no clipping anywhere.
    snap = Snapshots()
    t = trainer_cls(model=tiny_llama(), args=args(tmp_path, 3, max_grad_norm=0.0),
                    train_dataset=rows(), callbacks=[snap, GuardCallback()])
    GradFault(t.model, UP, math.nan, at={2})
    t.train()
    assert same(snap.after[2], snap.after[1]) and not same(snap.after[3], snap.after[2])
    assert [(e["step"], e["reason"]) for e in events(tmp_path)] == [(2, "nonfinite_grad")]
    assert guard_of(t).max_grad_norm == 0.0 and guard_of(t).counters["clipped"] == 0
    norms = {h["step"]: h["grad_norm"] for h in t.state.log_history if "grad_norm" in h}
    if HAS_CLIP_METHOD and trainer_cls is Trainer:  # 5.3+ logs the norm it asked for
        assert math.isnan(norms[2]) and norms[1] > 0
    else:  # nothing asked: nothing logged
        assert norms == {}

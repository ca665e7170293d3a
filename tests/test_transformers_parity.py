"""A healthy run under ``GuardCallback()`` is a transformers run: side by side with a plain Trainer.

Each test runs the same thing twice, a plain ``transformers.Trainer`` and the same Trainer with
the one-line ``callbacks=[GuardCallback()]``, and asserts what must be equal: the exception type
and the start of its message for a bad resume, the resume result (weights) from a checkpoint a
user re-sharded, the public ``TrainerState`` (``best_model_checkpoint``) in memory and in the
saved ``trainer_state.json``, and bit-identical weights after a clean run. It also holds the one
line to what it promises when something does go wrong: a weight that turns inf never reaches a
checkpoint, the healthy one survives rotation and resume takes it; the guard's counters and a
halt survive ``restore_callback_states_from_checkpoint``. A regression in any of these shows
here, without transformers' own test suite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from finitetune import GuardCallback, GuardConfig, NonFiniteHalt
from finitetune.integrations.hf.mixin import guard_of
from finitetune.rundir import files as run_files
from finitetune.rundir.checkpoints import scan_nonfinite
from finitetune.testing import GradFault
from finitetune.testing.models import tiny_llama

VOCAB, SEQ = 64, 16
ROWS = torch.randint(0, VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(7))
UP = "model.layers.0.mlp.up_proj.weight"

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(n: int = 64) -> list[dict]:
    return [{"input_ids": ROWS[i], "labels": ROWS[i]} for i in range(n)]


def make(out: Path, steps: int, *, guarded: bool, callbacks=(), **kw) -> Trainer:
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=1.0,
                logging_steps=1, save_strategy="steps", save_steps=2, report_to="none",
                use_cpu=True, disable_tqdm=True, seed=0)
    cbs = [*callbacks, *([GuardCallback()] if guarded else [])]
    return Trainer(model=tiny_llama(vocab=VOCAB, kv_heads=2, positions=SEQ),
                   args=TrainingArguments(**(base | kw)), train_dataset=rows(), callbacks=cbs)


def weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def caught(call) -> BaseException:
    try:
        call()
    except Exception as exc:  # the parity is about which exception, so catch them all here
        return exc
    raise AssertionError("no exception")


# ---- the same outcome for the same mistake ------------------------------------------------------
@pytest.mark.parametrize("resume", ["missing", "none_saved"])
def test_a_bad_resume_raises_what_transformers_raises(tmp_path, resume):
    # A missing checkpoint path, and resume_from_checkpoint=True with none saved. Must: the
    # guarded Trainer's error is the same type (a ValueError) and starts with transformers' text.
    arg = str(tmp_path / "nowhere" / "checkpoint-9") if resume == "missing" else True
    plain = caught(lambda: make(tmp_path / "p", 2, guarded=False).train(
        resume_from_checkpoint=arg))
    guarded = caught(lambda: make(tmp_path / "g", 2, guarded=True).train(
        resume_from_checkpoint=arg))
    assert isinstance(plain, ValueError) and isinstance(guarded, ValueError)
    start = str(plain).split(":")[0].split("(")[0].strip()
    assert start.startswith(("Can't find a valid checkpoint", "No valid checkpoint found"))
    assert str(guarded).startswith(start), (str(plain), str(guarded))


def _reshard(checkpoint: Path) -> None:
    """What users (and transformers' own tests) do to a checkpoint: split the weights."""
    weights = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, checkpoint / shard, metadata={"format": "pt"})
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))


def test_a_resharded_checkpoint_resumes_as_in_transformers(tmp_path):
    # Must: a checkpoint whose weights were re-sharded after the save is resumed from (not
    # refused as partial), and the resumed runs end bit-identical, plain and guarded.
    ends = {}
    for name, guarded in (("plain", False), ("guarded", True)):
        first = make(tmp_path / name, 4, guarded=guarded)
        first.train()
        _reshard(tmp_path / name / "checkpoint-2")
        again = make(tmp_path / name, 4, guarded=guarded)
        again.train(resume_from_checkpoint=str(tmp_path / name / "checkpoint-2"))
        ends[name] = weights(again)
    assert all(torch.equal(a, b) for a, b in zip(ends["plain"], ends["guarded"], strict=True))


def test_public_state_and_saved_files_are_a_plain_trainers(tmp_path):
    # Must: without metric_for_best_model, best_model_checkpoint stays None in memory and in
    # every saved trainer_state.json (the pin against rotation is not public state); the clean
    # run's weights are bit-identical; rotation leaves the same checkpoints.
    plain = make(tmp_path / "p", 6, guarded=False, save_total_limit=1)
    plain.train()
    guarded = make(tmp_path / "g", 6, guarded=True, save_total_limit=1)
    guarded.train()
    assert plain.state.best_model_checkpoint is None
    assert guarded.state.best_model_checkpoint is None
    for out in (tmp_path / "p", tmp_path / "g"):
        for ckpt in run_files.checkpoints(out):
            assert json.loads((ckpt / "trainer_state.json").read_text())[
                "best_model_checkpoint"] is None
    assert [c.name for c in run_files.checkpoints(tmp_path / "p")] == \
        [c.name for c in run_files.checkpoints(tmp_path / "g")]
    assert all(torch.equal(a, b) for a, b in zip(weights(plain), weights(guarded), strict=True))


# ---- the one line protects checkpoints ----------------------------------------------------------
class InfWeightAfter(TrainerCallback):
    """Fault: one weight element becomes +inf at the end of optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                dict(model.named_parameters())[UP][0, 0] = math.inf


def test_the_one_line_callback_keeps_poisoned_weights_out_of_checkpoints(tmp_path):
    # Fault: a weight turns +inf after step 5; saves every 2 steps, save_total_limit=1, a plain
    # Trainer(callbacks=[GuardCallback()]) (nothing else added). Must: the guard halts; no
    # checkpoint on disk holds a NaN/inf; a healthy checkpoint survives rotation; a new
    # guarded Trainer resumes from it (resume_from_checkpoint=True) and trains on, finite.
    # Control: the same without the guard saves the poisoned state and rotates the rest away.
    plain = make(tmp_path / "p", 12, guarded=False, save_total_limit=1,
                 callbacks=[InfWeightAfter(5)])
    plain.train()
    assert [c.name for c in run_files.checkpoints(tmp_path / "p")] == ["checkpoint-12"]
    assert scan_nonfinite(tmp_path / "p" / "checkpoint-12")

    out = tmp_path / "g"
    guarded = make(out, 12, guarded=True, save_total_limit=1, callbacks=[InfWeightAfter(5)])
    with pytest.raises(NonFiniteHalt):
        guarded.train()
    kept = run_files.checkpoints(out)
    assert kept and all(scan_nonfinite(c) == [] for c in kept)
    assert "checkpoint-4" in [c.name for c in kept]
    resumed = make(out, 14, guarded=True, save_total_limit=1)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 14
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_one_checkpoint_callback_however_it_arrives(tmp_path):
    # Must: the one line adds exactly one CheckpointCallback; one given explicitly is not
    # doubled; GuardCallback(checkpoints=False) adds none (the documented switch).
    from finitetune.integrations.hf.checkpoint_callback import CheckpointCallback

    def count(t):
        return sum(isinstance(cb, CheckpointCallback) for cb in t.callback_handler.callbacks)

    assert count(make(tmp_path / "a", 2, guarded=True)) == 1
    assert count(make(tmp_path / "b", 2, guarded=False,
                      callbacks=[CheckpointCallback(), GuardCallback()])) == 1
    assert count(make(tmp_path / "c", 2, guarded=False,
                      callbacks=[GuardCallback(checkpoints=False)])) == 0


# ---- restored callbacks keep counting -----------------------------------------------------------
def test_counters_and_halts_survive_a_restored_callback(tmp_path):
    # Fault: NaN at step 2 (run a, checkpoints every 2 steps). Run b resumes from checkpoint-4
    # with restore_callback_states_from_checkpoint=True (the Trainer rebuilds the GuardCallback
    # from the checkpoint) and NaN gradients from then on, max_consecutive_skips=1. Must: the
    # Trainer's guard (guard_of, what finitetune run's summary reads) carries a's counters on,
    # and the halt is raised.
    from finitetune.integrations.launch.callbacks import RunRecorder
    from finitetune.integrations.launch.manifest import read_manifest

    cfg = GuardConfig(max_consecutive_skips=1)
    a = make(tmp_path / "a", 4, guarded=False, callbacks=[GuardCallback(cfg)])
    GradFault(a.model, UP, math.nan, at={2})
    a.train()
    assert guard_of(a).counters["skipped"] == 1
    manifest = tmp_path / "manifest.jsonl"
    b = make(tmp_path / "a", 8, guarded=False, restore_callback_states_from_checkpoint=True,
             callbacks=[GuardCallback(cfg), RunRecorder(manifest, tmp_path / "a")])
    GradFault(b.model, UP, math.nan)  # every backward from the resume on
    with pytest.raises(NonFiniteHalt):
        b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    guard = guard_of(b)
    assert guard.counters["skipped"] == 3  # 1 from run a, then steps 5 and 6 (halt at 6)
    assert guard.last_outcome.action == "halt"
    (run,) = read_manifest(manifest)  # what finitetune run's summary and exit code read
    assert run.halted and run.counters["skipped"] == 3

"""Checkpoint health: partial and non-finite checkpoints detected; poisoned saves refused.

Unit part: synthetic ``checkpoint-N`` folders (the Trainer's file layout) damaged the ways a
SIGKILL or a NaN leaves them; each must get the named verdict, and resume must pick the newest
healthy one and set the others aside (renamed, never deleted).

Trainer part (the issue's "Done when"): a weight turns +inf at the end of step 5 with
``save_steps=2`` and ``save_total_limit=1``. Without finitetune the Trainer saves the poisoned
state and rotation deletes the last healthy checkpoint (the control shows it); with the
callbacks no checkpoint on disk holds a non-finite value, checkpoint-4 survives (pinned), the
refusals are events, and ``train(resume_from_checkpoint=True)`` resumes from checkpoint-4,
skipping a newer poisoned checkpoint and saying why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finitetune.errors import ConfigError
from finitetune.guard.state_check import check_state
from finitetune.rundir import files as run_files
from finitetune.rundir.checkpoints import (
    Health,
    inspect_checkpoint,
    scan_nonfinite,
    select_checkpoint,
    write_marker,
)
from finitetune.rundir.resume import prepare_resume


def _fake_checkpoint(root: Path, step: int, *, marker: bool = False) -> Path:
    """A complete checkpoint in the Trainer's layout (weights, optimizer, scheduler, state)."""
    torch.manual_seed(step)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              path / "model.safetensors")
    torch.save(opt.state_dict(), path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if marker:
        write_marker(path, step)
    return path


def _truncate(f: Path, keep: float = 0.5) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "empty": (lambda p: [f.unlink() for f in p.iterdir()], "empty folder"),
    "no_state": (lambda p: (p / "trainer_state.json").unlink(), "no trainer_state.json"),
    "torn_state": (lambda p: (p / "trainer_state.json").write_text('{"global_st'),
                   "not valid JSON"),
    "wrong_step": (lambda p: (p / "trainer_state.json").write_text('{"global_step": 3}'),
                   "says step 3"),
    "torn_weights": (lambda p: _truncate(p / "model.safetensors", 0.9), "cut short"),
    "torn_optimizer": (lambda p: _truncate(p / "optimizer.pt"), "optimizer.pt is cut short"),
    "no_scheduler": (lambda p: (p / "scheduler.pt").unlink(), "no scheduler.pt"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_partial_checkpoints_are_detected_with_the_reason(tmp_path, case):
    path = _fake_checkpoint(tmp_path, 4)
    assert inspect_checkpoint(path).ok
    damage, why = DAMAGE[case]
    damage(path)
    health = inspect_checkpoint(path)
    assert health.health == Health.PARTIAL and why in health.reason, health


def test_deepspeed_layout_is_complete_without_optimizer_pt(tmp_path):
    path = _fake_checkpoint(tmp_path, 4)
    (path / "optimizer.pt").unlink()  # DeepSpeed keeps it under global_step4/
    (path / "global_step4").mkdir()
    (path / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (path / "latest").write_text("global_step4")
    assert inspect_checkpoint(path).ok
    (path / "trainer_state.json").unlink()  # killed before the Trainer finished the save
    assert inspect_checkpoint(path).health == Health.PARTIAL


def test_marker_trusts_an_intact_checkpoint_and_catches_a_later_truncation(tmp_path):
    path = _fake_checkpoint(tmp_path, 6, marker=True)
    marker = json.loads((path / run_files.CHECKPOINT_MARKER).read_text())
    assert marker["finite"] is True and "optimizer.pt" in marker["files"]
    assert inspect_checkpoint(path).reason == "checked finite when saved"
    _truncate(path / "optimizer.pt", 0.99)
    health = inspect_checkpoint(path)
    assert health.health == Health.PARTIAL and "optimizer.pt" in health.reason


def test_a_checkpoint_changed_after_its_save_is_judged_by_its_content(tmp_path):
    # Users re-shard, convert or copy checkpoints (transformers' own tests re-shard them). Must:
    # a re-sharded folder whose tensors load and are finite is healthy, with the change as a
    # note, never refused for the save-time file list; the same folder with a NaN weight is
    # non-finite.
    path = _fake_checkpoint(tmp_path, 6, marker=True)
    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, path / shard)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items()
                                        for k in keys}}))
    health = inspect_checkpoint(path)
    assert health.ok, health.describe()
    assert "changed since saved (model.safetensors is missing" in health.reason
    shard = next(iter(shards))
    bad = load_file(path / shard)
    first = next(iter(bad))
    bad[first].view(-1)[0] = float("nan")
    save_file(bad, path / shard)
    assert inspect_checkpoint(path).health == Health.NONFINITE


@pytest.mark.parametrize("where", ["weights", "optimizer"])
def test_nonfinite_checkpoints_are_detected_and_named(tmp_path, where):
    path = _fake_checkpoint(tmp_path, 2)
    if where == "weights":
        w = load_file(path / "model.safetensors")
        w["bias"][1] = float("nan")
        save_file(w, path / "model.safetensors")
    else:
        state = torch.load(path / "optimizer.pt", weights_only=True)
        state["state"][0]["exp_avg_sq"][0, 0] = float("inf")
        torch.save(state, path / "optimizer.pt")
    health = inspect_checkpoint(path)
    assert health.health == Health.NONFINITE
    assert ("bias" if where == "weights" else "exp_avg_sq") in health.reason
    assert scan_nonfinite(path)


def test_resume_picks_the_newest_healthy_and_sets_the_rest_aside(tmp_path):
    for step in (2, 4, 6, 8):
        _fake_checkpoint(tmp_path, step, marker=step == 2)
    (tmp_path / "checkpoint-8" / "optimizer.pt").unlink()  # killed mid-save
    w = load_file(tmp_path / "checkpoint-6" / "model.safetensors")
    w["weight"][0, 0] = float("inf")
    save_file(w, tmp_path / "checkpoint-6" / "model.safetensors")
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    chosen, rejected = select_checkpoint(tmp_path)
    assert chosen.name == "checkpoint-4"
    assert [(h.name, h.health) for h in rejected] == [("checkpoint-8", Health.PARTIAL),
                                                      ("checkpoint-6", Health.NONFINITE)]
    plan = prepare_resume(tmp_path)
    assert plan.step == 4 and plan.moved == ["partial-checkpoint-8", "nonfinite-checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-2", "checkpoint-4", "nonfinite-checkpoint-6", "partial-checkpoint-8"]
    assert [r["step"] for r in run_files.read_jsonl(tmp_path / "metrics.jsonl").records] == [
        1, 2, 3, 4]
    event = run_files.read_jsonl(tmp_path / "events.jsonl").records[-1]
    assert event["action"] == "resume" and event["checkpoint"] == "checkpoint-4"
    assert any("truncated last line" in n for n in event["repaired"])
    assert "skipped checkpoint-8: partial" in event["message"]


def test_state_check_covers_trainable_params_and_optimizer_moments():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert check_state(model, opt).finite
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # frozen: not saved in an adapter checkpoint
    assert check_state(model, opt).finite
    opt.state[model[1].weight]["exp_avg"][0, 0] = float("inf")
    check = check_state(model, opt)
    assert not check.finite and check.nonfinite == ["optimizer:1.weight.exp_avg"]


# --------------------------------------------------------------------------- the Trainer


class _InfWeightAt:
    """Test fault: one weight element becomes +inf at the end of optimizer step ``step``."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class Cb(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step == step:
                    with torch.no_grad():
                        dict(model.named_parameters())[
                            "model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
        return Cb()


def _trainer(tiny_model_dir, out: Path, *, guarded: bool, steps: int = 12, callbacks=()):
    from transformers import TrainingArguments

    from finitetune.builtin.tasks import tiny_task
    from finitetune.data.pipeline import prepare_rows
    from finitetune.integrations.hf.trainer import build_trainer
    from finitetune.models import load_model, load_tokenizer
    from finitetune.settings.config import DataConfig, GuardConfig

    tok = load_tokenizer(tiny_model_dir)
    rows, _, _ = prepare_rows(tiny_task(64, seed=3), tok, DataConfig(max_length=32))
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, save_strategy="steps", save_steps=2, save_total_limit=1,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, remove_unused_columns=False,
        dataloader_num_workers=0)
    trainer, _ = build_trainer(load_model(tiny_model_dir), args, rows,
                               pad_token_id=tok.pad_token_id, attribution=False,
                               guard=GuardConfig() if guarded else None)
    for cb in callbacks:
        trainer.add_callback(cb)
    return trainer


@pytest.mark.slow
def test_inf_weight_never_reaches_a_checkpoint_and_resume_uses_the_healthy_one(
        tmp_path, tiny_model_dir, one_thread, caplog):
    from finitetune.errors import NonFiniteHalt

    # control: the plain Trainer saves the poisoned state and rotates checkpoint-4 away
    plain = tmp_path / "plain"
    _trainer(tiny_model_dir, plain, guarded=False, callbacks=[_InfWeightAt(5)]).train()
    assert [p.name for p in run_files.checkpoints(plain)] == ["checkpoint-12"]
    assert scan_nonfinite(plain / "checkpoint-12")

    out = tmp_path / "guarded"
    trainer = _trainer(tiny_model_dir, out, guarded=True, callbacks=[_InfWeightAt(5)])
    with pytest.raises(NonFiniteHalt):  # steps 6-10 skipped, step 11 halts
        trainer.train()
    # checkpoint-2 was pinned when checkpoint-4 was saved (rotation kept both); the saves of
    # the poisoned state were refused, so nothing rotated after that: both healthy ones stay
    assert [p.name for p in run_files.checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert trainer.state.best_model_checkpoint is None  # as a plain Trainer leaves it
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())[
        "best_model_checkpoint"] is None
    for path in out.glob("*checkpoint-*"):
        assert scan_nonfinite(path) == [], path
    refused = [e for e in run_files.read_jsonl(out / "events.jsonl").records
               if e.get("action") == "save_refused"]
    assert [e["step"] for e in refused] == [6, 8, 10]
    assert all(e["pinned"] == "checkpoint-4" and e["nonfinite"][0].endswith("up_proj.weight")
               for e in refused)

    # a newer checkpoint with NaN weights, as an unguarded earlier run would have left it
    poisoned = out / "checkpoint-12"
    shutil.copytree(plain / "checkpoint-12", poisoned)
    resumed = _trainer(tiny_model_dir, out, guarded=True)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 12
    event = [e for e in run_files.read_jsonl(out / "events.jsonl").records
             if e.get("action") == "resume"][-1]
    assert event["checkpoint"] == "checkpoint-4"
    assert event["skipped"][0]["checkpoint"] == "checkpoint-12"
    assert event["skipped"][0]["health"] == "nonfinite"
    assert "skipped checkpoint-12: nonfinite" in caplog.text
    assert check_state(resumed.model).finite
    for path in run_files.checkpoints(out):
        assert scan_nonfinite(path) == [], path
    assert event["abandoned"] == {"skip": [6, 7, 8, 9, 10], "save_refused": [6, 8, 10],
                                  "halt": [11]}  # the history survives the trimmed timeline
    elsewhere = shutil.copytree(plain / "checkpoint-12", tmp_path / "other" / "checkpoint-12")
    with pytest.raises(ConfigError, match="nonfinite"):  # an explicit bad path is refused
        resumed.train(resume_from_checkpoint=str(elsewhere))


def test_without_a_healthy_checkpoint_require_changes_nothing_and_restart_starts_at_0(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()  # killed mid-save
    metrics = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(metrics)
    plan = prepare_resume(tmp_path, require=True)  # Trainer(resume_from_checkpoint=True)
    assert plan.checkpoint is None and plan.rejected[0].health == Health.PARTIAL
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "events.jsonl").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    plan = prepare_resume(tmp_path)  # finitetune train --resume: start again from step 0
    assert plan.step == 0 and (tmp_path / "partial-checkpoint-2").is_dir()
    assert (tmp_path / "metrics.jsonl").read_text() == ""

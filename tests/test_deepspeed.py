"""DeepSpeed ZeRO-1/2/3 under the guard: a NaN on one rank skipped on
both, and a rank whose weights drifted named.

Real DeepSpeed (CPU accelerator), real Trainer, 2 gloo processes per test
(``finitetune.testing.run_distributed``, hard timeout: a hang fails the test). Each spawned pair
runs the guarded job *and* its control in the same processes (DeepSpeed's start-up dominates a
run's cost). The control is the same seed and data with the faulty step's batch simply not
taken; "bit-identical" is ``torch.equal`` on every model parameter (gathered under ZeRO-3), every
fp32 master partition, every optimizer-state tensor of this rank's partition, and the LR.

The first DeepSpeed start compiles a small shared-memory op with g++ (~90 s); it is cached in
``TORCH_EXTENSIONS_DIR`` (``make test`` points it into ``.venv``), so only the first test pays.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from transformers import TrainerCallback

from finitetune.testing import GradFault, run_distributed

pytestmark = pytest.mark.slow

VOCAB, SEQ = 32, 8
TIMEOUT = 420  # per spawned pair: a cold start compiles DeepSpeed's comm op (~90 s)
BAD_STEP = 3
ROWS_PER_STEP = 4  # 2 ranks x per-device batch 2; the sampler is sequential
FAULT_PARAM = "model.layers.0.mlp.up_proj.weight"


def _rows(n: int = 20) -> list[dict]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: SEQ // 2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _control_rows() -> list[dict]:
    """The guarded run's data without the rows of the faulty step (both ranks' shares)."""
    rows = _rows()
    lo = (BAD_STEP - 1) * ROWS_PER_STEP
    return rows[:lo] + rows[lo + ROWS_PER_STEP:]


def _ds_config(stage: int, bf16: bool, check_grad_overflow: bool | None) -> dict:
    cfg: dict = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
                 "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                 "gradient_clipping": "auto"}
    if bf16:
        cfg["bf16"] = {"enabled": True}
        if check_grad_overflow is not None:
            cfg["bf16"]["check_grad_overflow"] = check_grad_overflow
    return cfg


def _trainer(out_dir: str, stage: int, rows: list[dict], max_steps: int, callbacks: list, *,
             bf16: bool = False, check_grad_overflow: bool | None = None,
             max_grad_norm: float = 1.0) -> object:
    os.environ["DS_ACCELERATOR"] = "cpu"  # before transformers imports deepspeed
    from transformers import Trainer, TrainingArguments

    from finitetune.testing.models import tiny_llama

    # the same initial weights in every run and on every rank
    model = tiny_llama(vocab=VOCAB, hidden=16, heads=2, positions=SEQ)
    args = TrainingArguments(
        output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=2,
        learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=max_grad_norm,
        use_cpu=True, bf16=bf16, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, remove_unused_columns=False, train_sampling_strategy="sequential",
        deepspeed=_ds_config(stage, bf16, check_grad_overflow))
    return Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks)


def _state(trainer, stage: int) -> dict[str, torch.Tensor]:
    """Everything a skipped step must leave untouched, for this rank."""
    import deepspeed

    zo = trainer.model_wrapped.optimizer
    masters = (zo.fp32_partitioned_groups_flat if stage == 3
               else zo.single_partition_of_fp32_groups)
    out: dict[str, torch.Tensor] = {}
    for i, m in enumerate(masters):
        out[f"master{i}"] = m.detach().clone()
        for key, value in zo.optimizer.state.get(m, {}).items():
            out[f"opt{i}.{key}"] = (value.detach().clone() if torch.is_tensor(value)
                                    else torch.tensor(float(value)))
    out["lr"] = torch.tensor([g["lr"] for g in zo.optimizer.param_groups])
    named = list(trainer.model.named_parameters())
    # COLLECTIVE under ZeRO-3 (all ranks call it): the full parameters
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=stage == 3):
        for name, p in named:
            out[f"model.{name}"] = p.detach().clone()
    return out


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys()
                  if k not in a or k not in b or not torch.equal(a[k], b[k]))


def _model_params(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("model.")}


class Record(TrainerCallback):
    """Keeps each step's guard outcome (step, applied, reason, pre-clip norm)."""

    def __init__(self, guard_cb) -> None:
        self.guard_cb = guard_cb
        self.steps: list[tuple] = []

    def on_step_end(self, args, state, control, **kwargs):
        o = self.guard_cb.guard.last_outcome
        self.steps.append((o.step, o.applied, o.reason.value if o.reason else None, o.grad_norm))


# --------------------------------------------------------------------------- ZeRO-1/2/3: NaN


def _nan_on_rank1_vs_control(stage: int, out_dir: str, bf16: bool,
                             check_grad_overflow: bool | None) -> dict:
    from finitetune import GuardCallback

    rank = dist.get_rank()
    res: dict = {}
    # 1. unguarded, fault on rank 1 at step 3: what DeepSpeed alone does
    if bf16:
        trainer = _trainer(f"{out_dir}/plain", stage, _rows(), 5, [], bf16=bf16,
                           check_grad_overflow=check_grad_overflow)
        fault = GradFault(trainer.model, FAULT_PARAM, at={BAD_STEP}) if rank == 1 else None
        trainer.train()
        plain = _state(trainer, stage)
        res["plain_finite"] = all(bool(v.isfinite().all()) for v in _model_params(plain).values())
        res["plain_skipped_steps"] = trainer.model_wrapped.skipped_steps
        res["plain_log"] = [h.get("grad_norm") for h in trainer.state.log_history if "loss" in h]
    # 2. guarded, same fault
    guard_cb = GuardCallback()
    record = Record(guard_cb)
    trainer = _trainer(f"{out_dir}/guarded", stage, _rows(), 5, [guard_cb, record], bf16=bf16,
                       check_grad_overflow=check_grad_overflow)
    fault = GradFault(trainer.model, FAULT_PARAM, at={BAD_STEP}) if rank == 1 else None
    trainer.train()
    res["fired"] = fault.fired if fault is not None else []
    guarded = _state(trainer, stage)
    res["skipped_steps"] = trainer.model_wrapped.skipped_steps
    res["guard"] = dict(guard_cb.guard.counters)
    res["steps"] = record.steps
    res["logged_norms"] = [h.get("grad_norm") for h in trainer.state.log_history if "loss" in h]
    res["lr_sched_epoch"] = trainer.lr_scheduler.last_epoch
    # 3. control: the faulty step's batch never taken
    control_trainer = _trainer(f"{out_dir}/control", stage, _control_rows(), 4, [], bf16=bf16,
                               check_grad_overflow=check_grad_overflow)
    control_trainer.train()
    control = _state(control_trainer, stage)
    res["diff_vs_control"] = _diff(guarded, control)
    res["lr_sched_epoch_control"] = control_trainer.lr_scheduler.last_epoch
    res["model"] = _model_params(guarded)
    res["finite"] = all(bool(v.isfinite().all()) for v in res["model"].values())
    return res


def _check_nan_run(tmp_path, r0: dict, r1: dict) -> None:
    assert r0["fired"] == [] and r1["fired"] == [BAD_STEP]  # the fault: rank 1, step 3, only
    for r in (r0, r1):
        assert r["diff_vs_control"] == [], r["diff_vs_control"]  # bit-identical to the control
        assert r["guard"]["skipped"] == 1 and r["guard"]["nonfinite_grad"] == 1
        assert r["skipped_steps"] == r["guard"]["skipped"]  # DeepSpeed's counter agrees
        assert r["lr_sched_epoch"] == r["lr_sched_epoch_control"] == 4  # held on the skip
        assert r["finite"]
        assert math.isnan(r["logged_norms"][BAD_STEP - 1])  # the true norm, not DeepSpeed's inf
    assert [s[:3] for s in r0["steps"]] == [s[:3] for s in r1["steps"]]  # same decisions
    assert [s[1] for s in r0["steps"]] == [True, True, False, True, True]
    # on applied steps the guard's global norm (partition squares summed over ranks) is
    # DeepSpeed's own global norm, which the Trainer logs
    for (_, applied, _, norm), logged in zip(r0["steps"], r0["logged_norms"]):
        if applied:
            assert abs(norm - logged) <= 1e-5 * logged, (norm, logged)
    assert _diff(r0["model"], r1["model"]) == []  # replicas equal across ranks
    events = [json.loads(x) for x in (tmp_path / "guarded" / "events.jsonl").read_text()
              .splitlines()]
    assert [(e["step"], e["reason"], e["action"], e["world_size"]) for e in events] == [
        (BAD_STEP, "nonfinite_grad", "skip", 2)]
    # the rank whose gradient *partition* held the NaN after ZeRO's reduction, and the
    # parameter named from that partition (the model's own .grad is empty under ZeRO)
    (owner,) = events[0]["nonfinite_grad_ranks"]
    per_rank = {p["rank"]: p for p in events[0]["per_rank"]}
    assert per_rank[owner]["nonfinite_params"] == [FAULT_PARAM]
    assert per_rank[1 - owner]["nonfinite_params"] == []


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_nan_grad_on_rank1_skipped_bit_identical_to_control(tmp_path, stage):
    """ZeRO-1/2/3, fp32, a NaN in one gradient element on rank 1 at step 3 ->
    both ranks skip step 3 (same decisions every step), the final state equals the control
    bit for bit, one event, DeepSpeed's ``skipped_steps`` equals the guard's count, the LR
    scheduler held, and the Trainer logs the true (NaN) norm of the skipped step."""
    r0, r1 = run_distributed(_nan_on_rank1_vs_control, stage, str(tmp_path), False, None,
                             timeout=TIMEOUT)
    _check_nan_run(tmp_path, r0, r1)


def test_bf16_zero2_without_deepspeed_overflow_check_guard_skips(tmp_path):
    """bf16 ZeRO-2 with ``bf16.check_grad_overflow: false``: DeepSpeed alone *applies* the NaN
    step (every weight NaN afterwards, the control shows); with the guard the step is skipped
    through DeepSpeed's own skip path and the run equals the control bit for bit."""
    r0, r1 = run_distributed(_nan_on_rank1_vs_control, 2, str(tmp_path), True, False,
                             timeout=TIMEOUT)
    for r in (r0, r1):
        assert r["plain_skipped_steps"] == 0 and not r["plain_finite"]  # the failure, shown
        assert r["plain_log"][BAD_STEP - 1] is not None
    _check_nan_run(tmp_path, r0, r1)


# --------------------------------------------------------------------------- rank_mismatch


def _zero2_rank1_weights_perturbed(out_dir: str) -> dict:
    from finitetune import GuardCallback, GuardConfig, NonFiniteHalt

    rank = dist.get_rank()

    class Perturb(TrainerCallback):
        """After step 2, rank 1's copy of one weight moves by 1e-3 (a bad device)."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if rank == 1 and state.global_step == 2:
                with torch.no_grad():
                    dict(model.named_parameters())[FAULT_PARAM].view(-1)[7] += 1e-3

    guard_cb = GuardCallback(GuardConfig(rank_check_every=3))
    trainer = _trainer(out_dir, 2, _rows(), 5, [guard_cb, Perturb()])
    out: dict = {}
    try:
        trainer.train()
        out["halted"] = None
    except NonFiniteHalt as exc:
        out["halted"] = str(exc)
    out["guard"] = dict(guard_cb.guard.counters)
    out["skipped_steps"] = trainer.model_wrapped.skipped_steps
    return out


def _extras(out_dir: str) -> dict:
    """The three smaller cases in one spawned pair (DeepSpeed's start-up dominates each)."""
    return {"mismatch": _zero2_rank1_weights_perturbed(f"{out_dir}/mismatch"),
            "refusals": _refusals(f"{out_dir}/refusals"),
            "rollback": _zero2_rollback(f"{out_dir}/rollback")}


@pytest.fixture(scope="module")
def extras(tmp_path_factory) -> tuple[dict, dict, object]:
    out = tmp_path_factory.mktemp("extras")
    r0, r1 = run_distributed(_extras, str(out), timeout=TIMEOUT)
    return r0, r1, out


def test_zero2_rank_with_perturbed_weights_is_named_by_rank_mismatch(extras):
    """Cross-rank drift under DeepSpeed ZeRO-2: rank 1's copy of a weight is changed after step 2;
    the parameter checksum (every 3 steps) rides in the guard's all-reduce and at step 3 both
    ranks find rank 1 out of line: one ``rank_mismatch`` event naming rank 1, and the default
    action halts both ranks (DeepSpeed's skip path leaves the weights untouched)."""
    *both, out = extras
    r0, r1 = (r["mismatch"] for r in both)
    for r in (r0, r1):
        assert r["halted"] and "rank_mismatch" in r["halted"]
        assert r["guard"]["applied"] == 2 and r["guard"]["rank_mismatches"] == 1
        assert r["skipped_steps"] == 1
    events = [json.loads(x) for x in (out / "mismatch" / "events.jsonl").read_text()
              .splitlines()]
    assert len(events) == 1
    e = events[0]
    assert (e["step"], e["reason"], e["action"]) == (3, "rank_mismatch", "halt")
    assert e["mismatch_in"] == "params" and e["mismatch_ranks"] == [1]
    assert e["reference_rank"] == 0


# --------------------------------------------------------------------------- start-up refusals


def _refusals(out_dir: str) -> dict:
    from finitetune import GuardCallback, GuardConfig
    from finitetune.errors import ConfigError

    out = {}
    cases = {
        "zero3_rollback": (3, GuardConfig(policy="rollback")),
        "clip_mismatch": (2, GuardConfig(max_grad_norm=0.5)),
    }
    for name, (stage, cfg) in cases.items():
        trainer = _trainer(f"{out_dir}/{name}", stage, _rows(8), 2, [GuardCallback(cfg)])
        try:
            trainer.train()
            out[name] = None
        except ConfigError as exc:
            out[name] = str(exc)
    return out


def test_what_cannot_work_under_a_stage_stops_at_start_up(extras):
    """Rollback under ZeRO-3 (partitioned parameters: no restorable snapshot) and a guard clip
    value different from DeepSpeed's ``gradient_clipping`` stop with a ConfigError at
    ``on_train_begin`` that says what to change, on every rank alike (no rank left waiting)."""
    r0, r1 = (r["refusals"] for r in extras[:2])
    assert r0 == r1
    assert "ZeRO-3" in r0["zero3_rollback"] and "rollback" in r0["zero3_rollback"]
    assert "gradient_clipping" in r0["clip_mismatch"]


# --------------------------------------------------------------------------- rollback, ZeRO-2


def _zero2_rollback(out_dir: str) -> dict:
    from finitetune import GuardCallback, GuardConfig

    rank = dist.get_rank()
    kept: dict = {}
    guard_cb = GuardCallback(GuardConfig(policy="rollback"))

    class Keep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (1, BAD_STEP):  # ZeRO-2: no collective in _state
                kept[state.global_step] = _state(trainer, 2)

    trainer = _trainer(out_dir, 2, _rows(), 4, [guard_cb, Keep()])
    fault = GradFault(trainer.model, FAULT_PARAM, at={BAD_STEP}) if rank == 1 else None
    trainer.train()
    before, after = kept[1], kept[BAD_STEP]
    return {"fired": fault.fired if fault else [], "counters": dict(guard_cb.guard.counters),
            "diff": _diff({k: v for k, v in before.items() if k != "lr"},
                          {k: v for k, v in after.items() if k != "lr"}),
            "lr_ratio": (after["lr"] / before["lr"]).tolist(),
            "skipped_steps": trainer.model_wrapped.skipped_steps}


def test_zero2_rollback_restores_master_weights_and_the_model_copy(extras):
    """Rollback under ZeRO-2 (refused under ZeRO-3): the NaN step 3 restores the last good
    snapshot (the state before step 2, i.e. after step 1): fp32 master partitions, optimizer
    state and, through DeepSpeed's all-gather, the model's own weights, bit for bit; the LR is
    multiplied by ``lr_backoff``; DeepSpeed counts the step as skipped."""
    r0, r1 = (r["rollback"] for r in extras[:2])
    assert r1["fired"] == [BAD_STEP]
    for r in (r0, r1):
        assert r["diff"] == [], r["diff"]
        assert r["lr_ratio"] == [0.5] * len(r["lr_ratio"])
        assert r["counters"]["rollbacks"] == 1 and r["skipped_steps"] == 1


# --------------------------------------------------------------------------- finitetune train


def test_finitetune_train_deepspeed_zero2_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node 2 -m finitetune train --deepspeed ZERO2.json`` (CPU, gloo):
    trains, the guard's counters reach the logs, rank 0 writes one consistent run directory."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from finitetune.testing import free_port

    torchrun = Path(sys.executable).with_name("torchrun")
    torchrun = str(torchrun) if torchrun.exists() else shutil.which("torchrun")
    cfg = tmp_path / "zero2.json"
    cfg.write_text(json.dumps(_ds_config(2, False, None)))
    out = tmp_path / "run"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), "-m", "finitetune", "train", "--model", "tiny", "--max-steps", "3",
           "--logging-steps", "1", "--eval-size", "20", "--no-eval-before", "--deepspeed", str(cfg),
           "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail(f"torchrun train --deepspeed did not finish within {TIMEOUT} s")
    assert proc.returncode == 0, text[-3000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert "'guard/skipped': '0'" in text  # the guard ran inside DeepSpeed's step
    assert (out / "final").is_dir() and (out / "eval.json").is_file()


# --------------------------------------------------------------------------- finitetune run

_SCRIPT = '''"""A plain Trainer script with a DeepSpeed ZeRO-2 config: no finitetune in it."""
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2, max_position_embeddings=8))
rows = []
for i in range(24):
    ids = torch.randint(0, 32, (8,), generator=torch.Generator().manual_seed(i))
    labels = ids.clone()
    labels[:4] = -100
    rows.append({"input_ids": ids, "labels": labels})
zero2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
         "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto"}
args = TrainingArguments(output_dir=sys.argv[1], max_steps=5, per_device_train_batch_size=2,
                         learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                         logging_steps=1, disable_tqdm=True, remove_unused_columns=False,
                         deepspeed=zero2)
trainer = Trainer(model=model, args=args, train_dataset=rows)
trainer.train()
finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
print(f"rank {trainer.args.process_index}: finite {finite}, "
      f"skipped_steps {trainer.model_wrapped.skipped_steps}", flush=True)
'''


def test_finitetune_run_accelerate_launch_zero2_script_with_injected_nan(tmp_path):
    """``finitetune run --inject nan_grad@3 -- accelerate launch
    --multi_gpu --num_processes 2 SCRIPT`` on a Trainer script with a ZeRO-2 config (no
    finitetune in it): step 3 is skipped on both ranks, one event, finite weights, and
    DeepSpeed's own ``skipped_steps`` agrees."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from finitetune.testing import free_port

    launcher = Path(sys.executable).with_name("accelerate")
    launcher = str(launcher) if launcher.exists() else shutil.which("accelerate")
    script = tmp_path / "train_ds.py"
    script.write_text(_SCRIPT)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "finitetune", "run", "--inject", "nan_grad@3", "--",
           launcher, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
           str(free_port()), str(script), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail(f"finitetune run -- accelerate launch did not finish within {TIMEOUT} s")
    assert proc.returncode == 0, text[-3000:]
    assert "rank 0: finite True, skipped_steps 1" in text, text[-3000:]
    assert "rank 1: finite True, skipped_steps 1" in text, text[-3000:]
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["reason"], e["action"], e["world_size"]) for e in events] == [
        (3, "nonfinite_grad", "skip", 2)]


def test_deepspeed_config_checked_before_anything_is_written(tmp_path, monkeypatch):
    """``finitetune train --deepspeed FILE``: a missing file, a file that is not JSON (with its
    line) and a ZeRO stage the guard does not run under stop with exit 2 before anything is
    written; a good file selects DeepSpeed's CPU accelerator on a machine without CUDA."""
    from finitetune.cli.main import main

    monkeypatch.setenv("DS_ACCELERATOR", "unset")  # restored (or removed) after the test
    monkeypatch.delenv("DS_ACCELERATOR")
    cases = {"missing.json": None, "bad.json": '{"zero_optimization": {"stage": 2},\n oops}',
             "stage0.json": json.dumps({"zero_optimization": {"stage": 0}})}
    expected = {"missing.json": "no such file", "bad.json": "bad.json, line 2",
                "stage0.json": "stage is 0"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        out = tmp_path / f"run-{name}"
        code = main(["train", "--model", "tiny", "--deepspeed", str(tmp_path / name),
                     "--output-dir", str(out)])
        assert code == 2 and not out.exists(), name
    from finitetune.errors import ConfigError
    from finitetune.integrations.deepspeed.engine import load_config

    for name, text in expected.items():
        with pytest.raises(ConfigError, match=text):
            load_config(str(tmp_path / name), cuda=False)
    good = tmp_path / "zero2.json"
    good.write_text(json.dumps(_ds_config(2, False, None)))
    assert load_config(str(good), cuda=False)["zero_optimization"]["stage"] == 2
    assert os.environ["DS_ACCELERATOR"] == "cpu"

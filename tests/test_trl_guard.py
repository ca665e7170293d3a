"""TRL's trainers guarded, in-process (one-line callback) and through ``finitetune run -- trl ...``.

Every test injects a NaN into one gradient element at a chosen optimizer step with the same
injector ``finitetune run --inject`` uses, and asserts what a skip must leave: parameters and
every optimizer-state entry bit-identical across the skipped step, the optimizer's step count
and the LR schedule counting applied steps only, the Trainer's log telling the truth
(``grad_norm`` NaN at the skip, never a hidden ``loss 0.0``). The CLI tests are the issue's
done-when: the same program with and without the guard, and under ``torchrun`` with 2 ranks.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from finitetune import GuardCallback
from finitetune.integrations.launch.callbacks import FaultInjector

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

STEPS, BAD = 3, 2
BIN = Path(sys.executable).parent
PROMPTS = [f"q{i} is" for i in range(16)]


class StateAfterEachStep(TrainerCallback):
    """Parameters and optimizer state (every entry) after each optimizer step."""

    def __init__(self):
        self.params, self.opt = {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        ps = list(model.parameters())
        self.params[state.global_step] = [p.detach().clone() for p in ps]
        self.opt[state.global_step] = [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
            for p in ps if p in optimizer.state]


def _equal_states(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(
            torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in zip(a, b, strict=True))


def _trainer(kind, out, model_dir):
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    common = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2,
                  logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                  disable_tqdm=True, bf16=False, learning_rate=1e-3, seed=0)
    pref = Dataset.from_dict({"prompt": PROMPTS, "chosen": [" yes"] * 16,
                              "rejected": [" no"] * 16})
    recorder = StateAfterEachStep()
    cbs = [GuardCallback(), FaultInjector([f"nan_grad@{BAD}"]), recorder]
    if kind == "dpo":
        t = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                           args=trl.DPOConfig(**common), train_dataset=pref,
                           processing_class=tok, callbacks=cbs)
    elif kind == "kto":
        data = Dataset.from_dict({"prompt": PROMPTS, "completion": [" yes", " no"] * 8,
                                  "label": [True, False] * 8})
        t = trl.KTOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                           args=trl.KTOConfig(**common), train_dataset=data,
                           processing_class=tok, callbacks=cbs)
    elif kind == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        t = trl.RewardTrainer(model=model, args=trl.RewardConfig(**common), train_dataset=pref,
                              processing_class=tok, callbacks=cbs)
    else:
        def length_reward(completions, **kw):
            return [float(len(c)) for c in completions]

        t = trl.GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=length_reward,
            args=trl.GRPOConfig(num_generations=2, max_completion_length=4, **common),
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok,
            callbacks=cbs)
    return t, recorder


@pytest.mark.parametrize("kind", ["dpo", "kto", "reward", "grpo"])
def test_trl_trainer_with_the_callback_skips_a_nan_step(kind, tmp_path, tiny_model_dir):
    # Fault: NaN in one gradient element at step 2 of 3, one-line GuardCallback() in the TRL
    # trainer's callbacks. Must: params and optimizer state after step 2 == after step 1;
    # step 3 applied; the optimizer counted 2 steps, the scheduler advanced twice (LR held at
    # the skip); one event with attribution; the log shows NaN grad_norm and a finite loss.
    t, rec = _trainer(kind, tmp_path, tiny_model_dir)
    t.train()
    assert t.state.global_step == STEPS
    assert all(torch.equal(a, b) for a, b in zip(rec.params[BAD], rec.params[BAD - 1],
                                                  strict=True))
    assert _equal_states(rec.opt[BAD], rec.opt[BAD - 1])
    assert not all(torch.equal(a, b) for a, b in zip(rec.params[STEPS], rec.params[BAD],
                                                      strict=True))
    assert {int(s["step"]) for s in t.optimizer.state.values()} == {STEPS - 1}
    assert t.lr_scheduler.last_epoch == STEPS - 1
    logs = {h["step"]: h for h in t.state.log_history if "grad_norm" in h}
    assert logs[BAD]["learning_rate"] == logs[BAD + 1]["learning_rate"]
    assert math.isnan(logs[BAD]["grad_norm"]) and math.isfinite(logs[BAD]["loss"])
    (ev,) = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert (ev["step"], ev["reason"], ev["action"]) == (BAD, "nonfinite_grad", "skip")
    assert ev.get("nonfinite_params") and "verdict" in ev, ev


# ---- finitetune run -- trl ... ----------------------------------------------------------------
def _write_jsonl(path: Path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _data(kind, root: Path) -> Path:
    d = root / f"data_{kind}"
    if kind == "sft":
        _write_jsonl(d, [{"text": f"review {i}: it was {'good' if i % 2 else 'bad'}"}
                         for i in range(32)])
    elif kind in ("dpo", "reward"):
        _write_jsonl(d, [{"prompt": p, "chosen": " yes", "rejected": " no"} for p in PROMPTS])
    elif kind == "kto":
        _write_jsonl(d, [{"prompt": p, "completion": " yes" if i % 2 else " no",
                          "label": bool(i % 2)} for i, p in enumerate(PROMPTS)])
    else:
        _write_jsonl(d, [{"prompt": p} for p in PROMPTS])
        (root / "tiny_rewards.py").write_text(
            "def length_reward(completions, **kw):\n"
            "    return [float(len(c)) for c in completions]\n")
    return d


def _trl_args(kind, model_dir, data, out):
    extra = {"sft": ["--max_length", "32"], "dpo": ["--max_length", "32"], "kto": [],
             "reward": ["--max_length", "32"],
             "grpo": ["--num_generations", "2", "--max_completion_length", "4",
                      "--per_device_train_batch_size", "2", "--reward_funcs",
                      "tiny_rewards.length_reward"]}[kind]
    return ["--model_name_or_path", str(model_dir), "--dataset_name", str(data),
            "--output_dir", str(out), "--max_steps", str(STEPS), "--per_device_train_batch_size",
            "2", "--logging_steps", "1", "--use_cpu", "--report_to", "none", "--save_strategy",
            "no", "--disable_tqdm", "true", "--bf16", "false", "--seed", "0", *extra]


def _finitetune_run(options, program, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "finitetune", "run", *options, "--", *program]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _events(out: Path):
    return [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]


def _nonfinite_weights(out: Path) -> int:
    return sum(int((~torch.isfinite(v)).sum()) for v in load_file(out / "model.safetensors")
               .values() if v.is_floating_point())


def _metrics(out: Path):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                      .splitlines())}


def test_finitetune_run_trl_sft_skips_what_the_unguarded_program_applies(tmp_path,
                                                                          tiny_model_dir):
    # Fault: --inject nan_grad@2 into `trl sft` (TRL's own CLI, through accelerate launch).
    # Must, guarded: exit 0; events.jsonl in the output dir with the skip and its attribution;
    # every saved weight finite; metrics show the skip and the LR held; the report printed.
    # The same program and fault with --no-guard (the program exactly as it runs without
    # finitetune): NaN weights and the seed's pattern (loss 0, grad_norm NaN) in its log.
    data = _data("sft", tmp_path)
    runs = {}
    for name, opts in (("guarded", []), ("unguarded", ["--no-guard"])):
        out = tmp_path / name
        runs[name] = _finitetune_run(["--inject", f"nan_grad@{BAD}", *opts],
                                     [str(BIN / "trl"), "sft",
                                      *_trl_args("sft", tiny_model_dir, data, out)], tmp_path)
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    g = tmp_path / "guarded"
    (ev,) = _events(g)
    assert (ev["step"], ev["reason"], ev["action"]) == (BAD, "nonfinite_grad", "skip")
    assert ev["nonfinite_params"] == ["model.layers.0.self_attn.q_proj.weight"]
    assert ev["verdict"] and ev["attribution"]["replays"]
    assert _nonfinite_weights(g) == 0
    m = _metrics(g)
    assert m[BAD]["skipped"] == 1 and m[BAD]["grad_norm"] is None
    assert m[BAD + 1]["learning_rate"] == m[BAD]["learning_rate"]
    assert "# Training health report" in runs["guarded"].stdout
    assert f"injected nan_grad@{BAD}" in runs["guarded"].stdout
    u = tmp_path / "unguarded"
    assert not (u / "events.jsonl").exists() and _nonfinite_weights(u) > 0
    mu = _metrics(u)
    assert mu[STEPS]["loss"] == 0.0 and mu[STEPS]["grad_norm_nonfinite"] == "nan"


def test_finitetune_run_under_torchrun_two_ranks_one_event(tmp_path, tiny_model_dir):
    # Fault: NaN at step 2 on rank 1 only, `torchrun --standalone --nproc_per_node 2` (gloo)
    # running TRL's sft script. Must: one event (written by rank 0) naming rank 1;
    # both ranks decided alike (both ran the attribution; the final parameters are identical
    # on both ranks); weights finite; no hang (timeout).
    data = _data("sft", tmp_path)
    out = tmp_path / "out"
    r = _finitetune_run(["--inject", f"nan_grad@{BAD}:rank1", "--no-report"],
                        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
                         "trl.scripts.sft", *_trl_args("sft", tiny_model_dir, data, out)],
                        tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (ev,) = _events(out)
    assert (ev["step"], ev["reason"], ev["world_size"]) == (BAD, "nonfinite_grad", 2)
    # rank 1's NaN (DDP's gradient all-reduce may spread it to rank 0 before the guard looks)
    assert 1 in ev["nonfinite_grad_ranks"] and [p["rank"] for p in ev["per_rank"]] == [0, 1]
    assert "parameters identical on all 2 ranks" in r.stdout
    assert _nonfinite_weights(out) == 0


@pytest.mark.parametrize("kind", ["dpo", "kto", "reward", "grpo"])
def test_finitetune_run_trl_cli(kind, tmp_path, tiny_model_dir):
    # Fault: --inject nan_grad@2 into `trl <kind>`. Must: exit 0, the one skip with its
    # attribution in the output dir, finite weights, the skip in metrics.jsonl, the report.
    data = _data(kind, tmp_path)
    out = tmp_path / "out"
    program = [str(BIN / "trl"), kind, *_trl_args(kind, tiny_model_dir, data, out)]
    r = _finitetune_run(["--inject", f"nan_grad@{BAD}"], program, tmp_path)
    if r.returncode != 0:  # is it the guard, or does this TRL release's CLI fail by itself?
        control = _finitetune_run(["--no-guard", "--no-report"], program, tmp_path)
        if control.returncode != 0:
            import trl

            own = [x for x in control.stderr.splitlines()
                   if x.strip() and not x.startswith("finitetune run:")]
            last = (own or ["?"])[-1]  # the program's own error, not finitetune's summary
            pytest.skip(f"`trl {kind}` of TRL {trl.__version__} fails on this program without "
                        f"the guard too: {last}")
    assert r.returncode == 0, r.stderr[-3000:]
    (ev,) = _events(out)
    assert (ev["step"], ev["reason"]) == (BAD, "nonfinite_grad") and ev["nonfinite_params"]
    assert _nonfinite_weights(out) == 0
    assert _metrics(out)[BAD]["skipped"] == 1
    assert "# Training health report" in r.stdout

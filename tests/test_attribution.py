"""Attribution: after a step the guard does not apply, say where and why.

Plain-loop tests drive :class:`~finitetune.Guard` directly with ``guard.observe_batch``; one test
runs :class:`~finitetune.GuardCallback` on a real ``Trainer`` with gradient accumulation. The
faults are placed where real ones arise: a layer's output (hook), a module that overflows only
under fp16 autocast, NaN in one sample's float inputs, a corrupted embedding row that only one
sample's tokens reach, and a gradient written by a hook (not reproducible: transient).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from finitetune import Guard, GuardCallback
from finitetune.data.collate import CausalLMCollator
from finitetune.guard import attribution
from finitetune.guard.attribution import AttributionConfig, Attributor, load_fault_batch
from finitetune.testing import GradFault, OutputFault
from finitetune.testing.models import tiny_llama

VOCAB, SEQ, HID, BS = 64, 8, 32, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(layers: int = 2) -> LlamaForCausalLM:
    return tiny_llama(vocab=VOCAB, hidden=HID, intermediate=64, layers=layers, heads=2,
                      positions=SEQ, tie_word_embeddings=False)


def source(i: int) -> str:
    return f"data.jsonl:{i + 1}"


def batch_for(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB - 1, (BS, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "sample_ids": torch.arange(BS) + 10 * step}


def run_loop(model, guard, batches, faults=None, autocast=None):
    """One optimizer step per batch; ``faults[k]()`` installs a fault for step k (1-based) and
    returns its handle, removed after the step."""
    opt = guard.optimizer
    for k, batch in enumerate(batches, start=1):
        handle = faults[k]() if faults and k in faults else None
        ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast(
            "cpu", enabled=False)
        with ctx:
            out = model(**guard.observe_batch(batch))
        guard.observe_loss(out.loss)
        out.loss.backward()
        guard.step()
        opt.zero_grad()
        assert guard.batches == []  # references released at the end of every step
        if handle is not None:
            handle.remove()


def events(path) -> list[dict]:
    f = path / "events.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def guarded(model, tmp_path, **kw):
    att = Attributor(model, sources=source, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Guard(model, opt, output_dir=tmp_path, on_fault=att), att


def test_inf_in_one_layer_output_names_that_module_first_and_the_sample(tmp_path):
    model = tiny()
    guard, _ = guarded(model, tmp_path)
    batches = [batch_for(s) for s in range(1, 4)]
    ids3, inputs3 = batches[2]["sample_ids"].clone(), batches[2]["input_ids"].clone()
    # step 3: layer 1 emits +inf at row 2, position 0 (a real overflow starts in one place)
    run_loop(model, guard, batches, faults={
        3: lambda: OutputFault(model.model.layers[1], math.inf, index=2 * SEQ * HID)})
    (ev,) = events(tmp_path)
    assert ev["step"] == 3 and ev["action"] == "skip"
    assert ev["verdict"] == "data_or_model"
    assert ev["first_nonfinite_module"] == "model.layers.1"
    assert ev["attribution"]["replays"][0]["first_nonfinite_value"] == "inf"
    assert ev["sample_ids"] == ids3.tolist() == [30, 31, 32, 33]
    assert ev["sources"] == [source(i) for i in ids3.tolist()]
    assert ev["bad_samples"] == [{"index": 32, "source": "data.jsonl:33", "micro_batch": 1,
                                  "row": 2, "why": "nonfinite_output"}]
    assert "sample 32 (data.jsonl:33)" in ev["suggestion"]
    order = [n for n, _ in model.named_parameters()]
    assert ev["nonfinite_params"][0] == "model.embed_tokens.weight"
    assert ev["nonfinite_params"] == sorted(ev["nonfinite_params"], key=order.index)
    assert ev["nonfinite_weights"] == []
    saved = load_file(tmp_path / ev["batch_file"])
    assert ev["batch_file"] == "faults/step_3.safetensors"
    assert torch.equal(saved["1.input_ids"], inputs3)
    assert torch.equal(saved["1.sample_ids"], ids3)
    assert load_fault_batch(tmp_path / ev["batch_file"])[0].keys() == {
        "input_ids", "labels", "sample_ids"}


def test_overflow_only_in_fp16_is_classified_precision_overflow(tmp_path):
    model = tiny()
    with torch.no_grad():  # layer 0's norm now emits ~1e5: finite in fp32, inf in fp16
        model.model.layers[0].post_attention_layernorm.weight.mul_(1e5)
    batch = batch_for(1)
    guard, _ = guarded(model, tmp_path, autocast_dtype=torch.float16)
    run_loop(model, guard, [batch], autocast=torch.float16)
    (ev,) = events(tmp_path)
    assert ev["verdict"] == "precision_overflow"
    assert ev["first_fp16_overflow_module"] == "model.layers.0.post_attention_layernorm"
    assert ev["first_nonfinite_module"] == "model.layers.0.mlp.gate_proj"
    (replay,) = ev["attribution"]["replays"]
    assert replay["precision"] == "float16" and replay["original"] == "nonfinite"
    assert replay["fp32"] == "finite"
    assert "switch to bf16 or fp32" in ev["suggestion"]
    # control: the same model and batch trained in fp32 take the step
    control = tiny()
    control.load_state_dict(model.state_dict())
    guard32, _ = guarded(control, tmp_path / "fp32")
    run_loop(control, guard32, [batch_for(1)])
    assert guard32.counters["applied"] == 1 and not events(tmp_path / "fp32")


def test_nan_in_the_inputs_of_one_sample_names_that_sample(tmp_path):
    """Float inputs (``inputs_embeds``: soft prompts, multimodal features) can carry NaN."""
    model = tiny(layers=1)
    guard, _ = guarded(model, tmp_path)
    embeds = torch.randn(BS, SEQ, HID, generator=torch.Generator().manual_seed(1))
    embeds[1, 5, 3] = math.nan
    labels = torch.randint(0, VOCAB, (BS, SEQ), generator=torch.Generator().manual_seed(2))
    batch = {"inputs_embeds": embeds, "labels": labels, "sample_ids": torch.tensor([40, 41, 42,
                                                                                    43])}
    run_loop(model, guard, [batch])
    (ev,) = events(tmp_path)
    assert ev["verdict"] == "data_or_model"
    assert ev["bad_samples"] == [{"index": 41, "source": "data.jsonl:42", "micro_batch": 1,
                                  "row": 1, "why": "nonfinite_input"}]
    assert ev["suggestion"].startswith("sample 41 (data.jsonl:42) has NaN/inf in its inputs")


def test_gradient_fault_that_a_replay_does_not_reproduce_is_transient(tmp_path):
    model = tiny(layers=1)
    guard, _ = guarded(model, tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    with GradFault(model, name, math.nan, at={2}):
        run_loop(model, guard, [batch_for(s) for s in (1, 2, 3)])
    (ev,) = events(tmp_path)
    assert ev["step"] == 2 and ev["reason"] == "nonfinite_grad"
    assert ev["nonfinite_params"] == [name] and ev["nonfinite_param_count"] == 1
    (replay,) = ev["attribution"]["replays"]
    assert replay["original"] == "finite" and replay["backward"] == "finite"
    assert ev["verdict"] == "transient"
    assert "identical replay" in ev["suggestion"]
    assert {t["module"] for t in ev["top_grad_modules"]} <= {
        n.rsplit(".", 1)[0] for n, _ in model.named_parameters()}
    assert len(ev["top_grad_modules"]) == 5


def test_healthy_steps_do_no_attribution_work(tmp_path, monkeypatch):
    """No hook registered, no replay, no gradient pass, no file on clean steps: the whole cost
    is a list append per micro-batch. After a fault, all of it happens."""
    calls = {"hooks": 0, "forward": 0, "backward": 0, "maxabs": 0, "save": 0}

    def spy(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(torch.nn.Module, "register_forward_hook",
                        spy("hooks", torch.nn.Module.register_forward_hook))
    for key, name in (("forward", "replay_forward"), ("backward", "replay_backward"),
                      ("maxabs", "max_abs"), ("save", "save_fault_batch")):
        monkeypatch.setattr(attribution, name, spy(key, getattr(attribution, name)))
    model = tiny(layers=1)
    guard, att = guarded(model, tmp_path)
    run_loop(model, guard, [batch_for(s) for s in range(1, 5)])
    assert guard.counters["applied"] == 4
    assert calls == dict.fromkeys(calls, 0) and att.last is None
    fault = OutputFault(model.model.layers[0], math.nan)  # one hook of the test's own
    run_loop(model, guard, [batch_for(5)])
    fault.remove()
    n_modules = len(list(model.named_modules()))
    assert calls["hooks"] == 1 + n_modules  # the fault's hook + one traced replay
    assert calls["forward"] == 1 and calls["maxabs"] == 2 and calls["save"] == 1
    assert att.last["verdict"] == "data_or_model"


def test_bounds_switches_and_errors_never_stop_training(tmp_path, monkeypatch):
    def nan_step(model, guard, k):
        fault = OutputFault(model.model.layers[0], math.nan)
        run_loop(model, guard, [batch_for(k)])
        fault.remove()

    model = tiny(layers=1)
    guard, att = guarded(model, tmp_path / "off", config=AttributionConfig(enabled=False))
    nan_step(model, guard, 1)
    (ev,) = events(tmp_path / "off")
    assert "verdict" not in ev and "sample_ids" not in ev and att.last is None

    cfg = AttributionConfig(replay=False, max_events=1)
    guard, att = guarded(model, tmp_path / "noreplay", config=cfg)
    nan_step(model, guard, 1)
    nan_step(model, guard, 2)
    first, second = events(tmp_path / "noreplay")
    assert first["verdict"] == "not_replayed" and "replay is off" in first["suggestion"]
    assert first["sample_ids"] == [10, 11, 12, 13] and first["batch_file"]
    assert second["verdict"] == "not_replayed" and "max_events" in second["suggestion"]
    assert "batch_file" not in second

    def boom(*a, **k):
        raise RuntimeError("out of memory (simulated)")

    # a replay that fails: the step is still skipped and the gradients' facts stand
    monkeypatch.setattr(attribution, "replay_forward", boom)
    guard, _ = guarded(model, tmp_path / "err")
    nan_step(model, guard, 1)
    (ev,) = events(tmp_path / "err")
    assert ev["action"] == "skip" and ev["verdict"] == "not_replayed"
    assert "simulated" in ev["attribution"]["note"] and ev["attribution"]["replays"] == []
    assert ev["nonfinite_param_count"] > 0 and ev["nonfinite_params"]
    assert ev["sample_ids"] == [10, 11, 12, 13]

    # attribution itself failing (here: reading the gradients) never stops training either
    monkeypatch.setattr(attribution.Attributor, "_grads", boom)
    guard, _ = guarded(model, tmp_path / "err2")
    nan_step(model, guard, 1)
    (ev,) = events(tmp_path / "err2")
    assert ev["action"] == "skip" and "simulated" in ev["attribution_error"]


def test_trainer_with_accumulation_names_the_micro_batch_and_sample(tmp_path):
    """GuardCallback on a real Trainer, 2 micro-batches per step. Token 63's embedding row is
    NaN (a corrupted or badly initialised new token); only dataset row 106 contains it, in
    micro-batch 2 of step 2. The model never receives ``sample_ids``."""
    model = tiny(layers=1)
    with torch.no_grad():
        model.model.embed_tokens.weight[VOCAB - 1] = math.nan
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(12):
        ids = torch.randint(0, VOCAB - 1, (SEQ,), generator=g).tolist()
        if i == 6:
            ids[3] = VOCAB - 1
        rows.append({"input_ids": ids, "labels": ids, "index": 100 + i})
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(sorted(kw)), with_kwargs=True)
    att = Attributor(model, sources={100 + i: source(i) for i in range(12)})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential",
        remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=CausalLMCollator(0, sample_ids=True),
                      callbacks=[GuardCallback(on_fault=att)])
    trainer.train()
    assert seen and all("sample_ids" not in kw for kw in seen)
    (ev,) = events(tmp_path)
    assert ev["step"] == 2 and ev["action"] == "skip"
    assert ev["sample_ids"] == [104, 105, 106, 107]
    assert ev["bad_samples"] == [{"index": 106, "source": "data.jsonl:7", "micro_batch": 2,
                                  "row": 0, "why": "nonfinite_output"}]
    assert ev["verdict"] == "data_or_model"
    assert ev["first_nonfinite_module"] == "model.embed_tokens"
    assert ev["nonfinite_weights"] == ["model.embed_tokens.weight"]
    assert [r["original"] for r in ev["attribution"]["replays"]] == ["finite", "nonfinite"]
    assert "sample 106 (data.jsonl:7) produces NaN/inf" in ev["suggestion"]
    saved = load_fault_batch(tmp_path / ev["batch_file"])
    assert [mb["sample_ids"].tolist() for mb in saved] == [[104, 105], [106, 107]]
    assert saved[1]["input_ids"][0, 3] == VOCAB - 1
    assert trainer.state.global_step == 3


def test_trainer_autocast_is_replayed_and_the_fp32_replay_turns_it_off(tmp_path):
    """``bf16=True``: accelerate puts autocast inside ``model.forward``. The original-precision
    replay must compute in bf16 as the step did, the fp32 replay in fp32."""
    model = tiny(layers=1)
    rows = [{"input_ids": list(range(i, i + SEQ)), "labels": list(range(i, i + SEQ)),
             "index": i} for i in range(6)]

    class InjectAtStep2(TrainerCallback):
        handle = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                self.handle = OutputFault(model.model.layers[0], math.inf)

        def on_step_end(self, args, state, control, **kw):
            if self.handle is not None:
                self.handle = self.handle.remove()

    att = Attributor(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             bf16=True, use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=rows,
            data_collator=CausalLMCollator(0, sample_ids=True),
            callbacks=[InjectAtStep2(), GuardCallback(on_fault=att)]).train()
    (ev,) = events(tmp_path)
    (replay,) = ev["attribution"]["replays"]
    assert ev["step"] == 2 and ev["first_nonfinite_module"] == "model.layers.0"
    assert replay["precision"] == "bfloat16" and replay["fp32"] == "nonfinite"
    assert ev["verdict"] == "data_or_model"
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1, 2, 3]])}
    assert attribution.replay_forward(model, batch).compute_dtype == "bfloat16"
    assert attribution.replay_forward(model, batch, fp32=True).compute_dtype == "float32"

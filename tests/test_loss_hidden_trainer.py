"""The hidden-state loss on real models and in the Trainer.

Reference: the model's own loss (transformers' ``ForCausalLMLoss`` on full logits, what the
model returns when called with ``labels`` and ``num_items_in_batch``), fp32, tolerance 1e-5, for
every family of ``FAMILIES`` built from a tiny config (no network), with and without PEFT LoRA
(adapters on the blocks with a frozen tied head, LoRA on the head itself, ``modules_to_save``),
over a gradient-accumulation window that holds a fully masked micro-batch.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as T
from peft import LoraConfig, get_peft_model

from finitetune.errors import ConfigError
from finitetune.integrations.hf import lm_head as lm_head_mod
from finitetune.integrations.hf.hidden_loss import HiddenStateLoss, choose_loss
from finitetune.integrations.hf.lm_head import FAMILIES, UnsupportedModel
from finitetune.loss.causal import SafeCausalLMLoss

VOCAB = 96
TOL = dict(atol=1e-5, rtol=1e-5)
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
_FAMILIES = {  # class -> (config class, extra settings); soft-cap / scale chosen to matter
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 8}),
    "GemmaForCausalLM": ("GemmaConfig", {"head_dim": 8}),
    "Gemma2ForCausalLM": ("Gemma2Config", {"head_dim": 8, "final_logit_softcapping": 1.0}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {"head_dim": 8, "final_logit_softcapping": 1.0}),
    "Phi3ForCausalLM": ("Phi3Config", {"pad_token_id": 0}),
    "Olmo2ForCausalLM": ("Olmo2Config", {"pad_token_id": 0}),
    "SmolLM3ForCausalLM": ("SmolLM3Config", {"pad_token_id": 0}),
    "GraniteForCausalLM": ("GraniteConfig", {"logits_scaling": 4.0}),
    "CohereForCausalLM": ("CohereConfig", {"logit_scale": 2.0, "pad_token_id": 0}),
}
# The families this transformers release ships (SmolLM3 arrived in 4.53, for example).
CONFIGS = {family: (getattr(T, config), extra) for family, (config, extra) in _FAMILIES.items()
           if hasattr(T, family) and hasattr(T, config)}
LORA = {
    "none": None,
    "blocks": dict(target_modules=["q_proj", "v_proj", "up_proj"]),  # head frozen (tied or not)
    "head": dict(target_modules=["q_proj", "lm_head"]),  # LoRA on the head itself
    "save_head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, extra = CONFIGS[family]
    torch.manual_seed(seed)
    model = getattr(T, family)(config_cls(**{**COMMON, **extra, **overrides}))
    with torch.no_grad():  # logits of several units, so a soft-cap is far from the identity
        model.get_output_embeddings().weight.mul_(8)
    return model.train()


def with_lora(model, kind: str):
    if LORA[kind] is None:
        return model
    # init_lora_weights=False: B is random too, so the adapters change the logits; with tied
    # embeddings an adapted head keeps the tie (PEFT's advice), so the embedding is adapted too
    tied = bool(model.config.tie_word_embeddings) and kind in ("head", "save_head")
    # ensure_weight_tying exists from PEFT 0.18; older releases keep the tie without asking
    tying = {"ensure_weight_tying": tied} if "ensure_weight_tying" in {
        f.name for f in dataclasses.fields(LoraConfig)} else {}
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            init_lora_weights=False, **tying, **LORA[kind]))


def window(seed: int = 1) -> list[dict]:
    """Three micro-batches: padded rows with masked prompts, then all -100, then more rows."""
    g = torch.Generator().manual_seed(seed)
    mbs = []
    for i in range(3):
        ids = torch.randint(1, VOCAB, (2, 11), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100
        labels[1, 8:] = -100
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        if i == 1:
            labels[:] = -100
        mbs.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return mbs


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def accumulate(model, loss_fn=None):
    """Losses of each micro-batch and the window's accumulated gradients."""
    mbs = window()
    n = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in mbs)
    model.zero_grad(set_to_none=True)
    losses = []
    for mb in mbs:
        if loss_fn is None:  # transformers' own loss inside the model
            loss = model(**mb, num_items_in_batch=torch.tensor(n)).loss
        else:
            inputs = {k: v for k, v in mb.items() if k != "labels"}
            loss = loss_fn(model(**inputs), mb["labels"], torch.tensor(n))
        loss.backward()
        losses.append(loss.detach())
    return losses, {name: p.grad.clone() for name, p in trainable(model)}


def assert_same(expected, got):
    (exp_losses, exp_grads), (got_losses, got_grads) = expected, got
    assert got_losses[1].item() == 0.0  # the fully masked micro-batch adds exactly nothing
    torch.testing.assert_close(torch.stack(got_losses), torch.stack(exp_losses), **TOL)
    assert exp_grads.keys() == got_grads.keys()
    for name in exp_grads:
        torch.testing.assert_close(got_grads[name], exp_grads[name], **TOL, msg=name)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_family_equals_transformers_over_an_accumulation_window(family):
    model = tiny(family)
    expected = accumulate(model)
    loss = HiddenStateLoss(model)
    assert_same(expected, accumulate(model, loss))
    assert loss.window().empty_micro_batches.item() == 1


@pytest.mark.parametrize("lora", ["blocks", "head", "save_head"])
@pytest.mark.parametrize("family", ["LlamaForCausalLM", "Gemma2ForCausalLM", "Qwen2ForCausalLM"])
def test_lora_models_equal_transformers(family, lora):
    model = with_lora(tiny(family), lora)
    expected = accumulate(model)
    assert_same(expected, accumulate(model, HiddenStateLoss(model)))


@pytest.mark.parametrize("tied", [True, False])
def test_full_fine_tune_with_tied_or_biased_head(tied):
    model = tiny("LlamaForCausalLM", tie_word_embeddings=tied)
    if not tied:  # a head with a bias: the family's forward calls whatever lm_head is
        head = torch.nn.Linear(32, VOCAB, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.normal_()
        model.lm_head = head
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    expected = accumulate(model)
    assert_same(expected, accumulate(model, HiddenStateLoss(model)))


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_recomputes_the_same_loss_and_gradients(reentrant):
    """Checkpointed layers run their forward again inside backward: the hooks must neither
    fire there nor lose the hidden states the loss already holds (LoRA, frozen tied head)."""
    model = with_lora(tiny("LlamaForCausalLM"), "blocks")
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={
            "use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": reentrant})
    if reentrant:  # frozen embeddings: the reentrant variant needs an input that wants grad
        model.enable_input_require_grads()
    model.train()
    expected = accumulate(model)
    loss = HiddenStateLoss(model)
    assert_same(expected, accumulate(model, loss))
    assert loss.window().empty_micro_batches.item() == 1

# --- the hooks: only training forwards are cut ------------------------------------------------


def test_other_forwards_keep_their_logits_and_detach_restores_the_model():
    model = tiny("LlamaForCausalLM")
    mb = window()[0]
    loss = HiddenStateLoss(model)
    assert model(input_ids=mb["input_ids"]).logits.shape[1] == 0  # training forward: cut
    with torch.no_grad():  # evaluation / generation
        assert model(input_ids=mb["input_ids"]).logits.shape[1] == 11
        out = model.generate(mb["input_ids"][:1], max_new_tokens=3, do_sample=False)
        assert out.shape[1] == 14
    with_labels = model(**mb)  # the guard's replay: the model computes its own loss
    assert with_labels.logits.shape[1] == 11 and torch.isfinite(with_labels.loss)
    model.eval()
    eval_logits = model(input_ids=mb["input_ids"]).logits
    assert eval_logits.shape[1] == 11
    # full logits reach the loss too: then it is the regular safe loss on them
    expected = SafeCausalLMLoss()(eval_logits, mb["labels"])
    assert loss(eval_logits, mb["labels"]).item() == expected.item()
    model.train()
    loss.detach()
    assert model(input_ids=mb["input_ids"]).logits.shape[1] == 11


def test_a_second_loss_replaces_the_first():
    model = tiny("LlamaForCausalLM")
    mb = window()[0]
    first, second = HiddenStateLoss(model), HiddenStateLoss(model)
    out = model(input_ids=mb["input_ids"])
    assert first._hidden is None and second._hidden is not None
    assert torch.isfinite(second(out, mb["labels"]))


def test_cut_logits_without_hidden_states_is_a_loud_error():
    model = tiny("LlamaForCausalLM")
    mb = window()[0]
    loss = HiddenStateLoss(model)
    out = model(input_ids=mb["input_ids"])
    loss(out, mb["labels"])
    with pytest.raises(ConfigError, match="not captured"):
        loss(out, mb["labels"])  # the same outputs twice: the capture was used up


# --- models it does not understand -------------------------------------------------------------


def gpt2():
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2,
                                          n_positions=32)).train()


def test_unknown_model_class_fails_loudly_or_falls_back_with_a_reason():
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        HiddenStateLoss(gpt2())
    assert issubclass(UnsupportedModel, ConfigError)
    loss, line = choose_loss(gpt2(), "auto")
    assert type(loss) is SafeCausalLMLoss and "GPT2LMHeadModel" in line
    mb = window()[0]
    model = gpt2()
    loss, _ = choose_loss(model, "auto")
    assert model(input_ids=mb["input_ids"]).logits.shape[1] == 11  # nothing hooked
    with pytest.raises(UnsupportedModel):
        choose_loss(gpt2(), "supervised")
    loss, line = choose_loss(tiny("LlamaForCausalLM"), "full")
    assert type(loss) is SafeCausalLMLoss and "full" in line
    loss, line = choose_loss(tiny("LlamaForCausalLM"), "auto")
    assert isinstance(loss, HiddenStateLoss) and "supervised positions" in line
    with pytest.raises(ConfigError, match="unknown loss"):
        choose_loss(tiny("LlamaForCausalLM"), "fast")


def test_unsupported_heads_and_sharded_training_fall_back(monkeypatch):
    model = with_lora(tiny("LlamaForCausalLM"), "none")
    model.lm_head = torch.nn.Sequential(model.lm_head)  # not a Linear
    with pytest.raises(UnsupportedModel, match="Sequential"):
        HiddenStateLoss(model)
    dora = get_peft_model(tiny("LlamaForCausalLM"), LoraConfig(r=4, target_modules=["lm_head"],
                                                              use_dora=True))
    with pytest.raises(UnsupportedModel, match="variant"):
        HiddenStateLoss(dora)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    loss, line = choose_loss(tiny("LlamaForCausalLM"), "auto")
    assert type(loss) is SafeCausalLMLoss and "ACCELERATE_USE_FSDP" in line


def test_probe_catches_a_misread_soft_cap(monkeypatch):
    # Fault: the table forgets Gemma 2's soft-cap. The probe compares the model's own logits
    # with the head applied to its hidden states and must refuse at start-up.
    monkeypatch.setitem(FAMILIES, "Gemma2ForCausalLM", lm_head_mod._none)
    with pytest.raises(UnsupportedModel, match="differ"):
        HiddenStateLoss(tiny("Gemma2ForCausalLM"))
    loss, line = choose_loss(tiny("Gemma2ForCausalLM"), "auto")
    assert type(loss) is SafeCausalLMLoss and "differ" in line


class IgnoresLogitsToKeep(T.LlamaForCausalLM):
    def forward(self, *args, logits_to_keep=0, **kwargs):
        return super().forward(*args, **kwargs)


def test_probe_catches_a_model_that_ignores_logits_to_keep(monkeypatch):
    monkeypatch.setitem(FAMILIES, "IgnoresLogitsToKeep", lm_head_mod._none)
    torch.manual_seed(0)
    model = IgnoresLogitsToKeep(T.LlamaConfig(**COMMON))
    with pytest.raises(UnsupportedModel, match="ignores logits_to_keep"):
        HiddenStateLoss(model)
    loss = HiddenStateLoss(model, verify=False)  # without the probe: the first step says so
    mb = window()[0]
    with pytest.raises(ConfigError, match="logits_to_keep ignored"):
        loss(model(input_ids=mb["input_ids"]), mb["labels"])


# --- the Trainer, with the guard and the metrics log --------------------------------------------


def test_trainer_run_equals_the_full_loss_run_with_guard_and_metrics(tmp_path):
    # GA 2, one micro-batch of steps 1 and 3 fully masked; SGD so parameters follow gradients
    # linearly. Must hold: parameters after 3 steps equal the full-logits run within 1e-5, and
    # metrics.jsonl's loss, token and empty-micro-batch counts are the same.
    import json

    from transformers import Trainer, TrainingArguments

    from finitetune import GuardCallback
    from finitetune.integrations.hf.metrics import MetricsCallback

    rows = [{k: v[r] for k, v in mb.items()} for mb in window() + window(seed=2) for r in range(2)]

    def run(name, make_loss):
        model = tiny("Qwen2ForCausalLM")
        loss = make_loss(model)
        args = TrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=3, learning_rate=0.05, optim="sgd",
            lr_scheduler_type="constant", logging_steps=1, report_to="none",
            save_strategy="no", use_cpu=True, train_sampling_strategy="sequential",
            disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows, compute_loss_func=loss,
                          callbacks=[GuardCallback(), MetricsCallback(tmp_path / f"{name}.jsonl",
                                                                       tracker=loss)])
        trainer.train()
        lines = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        return dict(model.named_parameters()), lines

    fast_params, fast = run("fast", HiddenStateLoss)
    full_params, full = run("full", lambda model: SafeCausalLMLoss())
    for name, p in full_params.items():
        torch.testing.assert_close(fast_params[name], p, **TOL, msg=name)
    assert [m["empty_microbatches"] for m in fast] == [1, 0, 1]
    for key in ("tokens", "micro_batches", "empty_microbatches", "skipped"):
        assert [m[key] for m in fast] == [m[key] for m in full], key
    torch.testing.assert_close(torch.tensor([m["loss"] for m in fast]),
                               torch.tensor([m["loss"] for m in full]), **TOL)


# --- finitetune train ---------------------------------------------------------------------------


def test_train_uses_the_fast_loss_by_default_and_full_on_request(tmp_path, capsys):
    import yaml

    from finitetune.cli.main import main

    def train(name, *extra):
        args = ["train", "--model", "tiny", "--output-dir", str(tmp_path / name), "--max-steps",
                "2", "--eval-size", "8", "--no-eval-before", *extra]
        code = main(args)
        return code, capsys.readouterr()

    code, io = train("default")
    assert code == 0 and "loss: LM head only at supervised positions" in io.out
    code, io = train("full", "--loss", "full")
    assert code == 0 and "loss: full" in io.out
    assert yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())["loss"] == "full"
    code, io = train("bad", "--loss", "fast")
    assert code == 2 and "loss = 'fast' (flag --loss): expected one of: auto, supervised, full" in io.err
    assert not (tmp_path / "bad").exists()

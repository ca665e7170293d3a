"""causal_lm_loss and SafeCausalLMLoss: equal to transformers' loss where that one is right,
0.0 in the graph where it is NaN, and equal gradients however the batch is split."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from finitetune import causal_lm_loss
from finitetune.loss.causal import SafeCausalLMLoss, causal_lm_loss_parts
from finitetune.testing.models import tiny_llama

VOCAB = 64
CHUNKS = [None, 5]  # 5 does not divide the row counts used below: ragged last chunk


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    model = tiny_llama(vocab=VOCAB, layers=2, kv_heads=2, seed=seed)
    return model.eval()  # eval: no dropout, deterministic


def padded_batch(rows: int = 8, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths; prompt (first 3 tokens) and pads masked."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (rows, seq), generator=g)
    attention_mask = torch.ones(rows, seq, dtype=torch.long)
    labels = input_ids.clone()
    labels[:, :3] = -100
    for r in range(rows):
        length = seq - (r % 4) * 2  # 12, 10, 8, 6, ...
        attention_mask[r, length:] = 0
        input_ids[r, length:] = 0
        labels[r, length:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def random_logits(shape=(3, 9, VOCAB), seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_(True)


def random_labels(shape=(3, 9), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, shape, generator=g)
    labels[0, 5:] = -100  # a padded row
    labels[1, :2] = -100  # a masked prompt
    return labels


def grads(loss: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, wrt)
    return g


# --- equality with transformers' ForCausalLMLoss on ordinary batches ---------------------------


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("num_items", [None, 19, "tensor"])
def test_matches_transformers_loss_and_grads(chunk_size, num_items):
    logits, labels = random_logits(), random_labels()
    if num_items == "tensor":
        num_items = torch.tensor(19)
    expected = ForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=num_items)
    got = causal_lm_loss(logits, labels, num_items, chunk_size=chunk_size)
    assert got.dtype == torch.float32
    assert abs(got.item() - expected.item()) <= 1e-6
    torch.testing.assert_close(
        grads(got, logits), grads(expected, logits), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_matches_model_own_loss_on_padded_rows(chunk_size):
    model, batch = tiny_model(), padded_batch()
    out = model(**batch)  # the model's loss is ForCausalLMLoss over the same labels
    got = causal_lm_loss(out, batch["labels"], chunk_size=chunk_size)
    assert abs(got.item() - out.loss.item()) <= 1e-6
    via_mapping = causal_lm_loss({"logits": out.logits}, batch["labels"], chunk_size=chunk_size)
    assert via_mapping.item() == got.item()


def test_shift_labels_keyword_equals_shifting_here():
    logits, labels = random_logits(), random_labels()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    a = causal_lm_loss(logits, labels)
    b = causal_lm_loss(logits, None, shift_labels=shifted)
    assert a.item() == b.item()
    # and it really is used unshifted: passing labels as shift_labels gives another value
    assert causal_lm_loss(logits, None, shift_labels=labels).item() != a.item()


def test_chunked_equals_unchunked_for_every_chunk_size_with_z_loss():
    logits, labels = random_logits(), random_labels()
    ref = causal_lm_loss(logits, labels, 23, z_loss=1e-3)
    ref_grad = grads(ref, logits)
    for chunk_size in (1, 2, 7, 27, 1000):  # 27 = all rows in one chunk
        got = causal_lm_loss(logits, labels, 23, z_loss=1e-3, chunk_size=chunk_size)
        assert abs(got.item() - ref.item()) <= 1e-6, chunk_size
        torch.testing.assert_close(grads(got, logits), ref_grad, atol=1e-6, rtol=0)


def test_chunked_handles_minus_inf_logits_like_unchunked():
    logits, labels = random_logits(), random_labels()
    with torch.no_grad():
        banned = torch.ones(VOCAB, dtype=torch.bool)
        banned[labels.clamp(min=0).unique()] = False
        logits[..., banned] = float("-inf")  # vocabulary masking: never a target here
        logits[0, 6] = float("-inf")  # a whole row, at a masked position
    ref = causal_lm_loss(logits.detach(), labels)
    got = causal_lm_loss(logits, labels, chunk_size=4)
    assert math.isfinite(got.item()) and abs(got.item() - ref.item()) <= 1e-6
    assert torch.isfinite(grads(got, logits)).all()


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_z_loss_adds_mean_logsumexp_squared(chunk_size):
    logits, labels = random_logits(), random_labels()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    valid = shifted != -100
    lse = torch.logsumexp(logits.detach(), dim=-1)
    ce = causal_lm_loss(logits, labels, chunk_size=chunk_size)
    with_z = causal_lm_loss(logits, labels, z_loss=0.01, chunk_size=chunk_size)
    expected = ce.item() + 0.01 * (lse[valid] ** 2).sum().item() / valid.sum().item()
    assert with_z.item() == pytest.approx(expected, rel=1e-6)
    assert with_z.item() > ce.item()  # the penalty is on, and off by default


# --- zero supervised tokens: exact 0.0, in the graph, zero gradients ---------------------------


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("num_items", [None, 0, "tensor0"])
def test_fully_masked_batch_gives_zero_loss_and_zero_grads(chunk_size, num_items):
    logits = random_logits()
    labels = torch.full((3, 9), -100)
    if num_items == "tensor0":
        num_items = torch.tensor(0)
    # what the defaults do: mean over 0 tokens, and sum / 0
    assert math.isnan(ForCausalLMLoss(logits, labels, VOCAB).item())
    assert math.isnan(ForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=0).item())
    loss = causal_lm_loss(logits, labels, num_items, chunk_size=chunk_size)
    assert loss.item() == 0.0
    assert loss.requires_grad and loss.grad_fn is not None
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_fully_masked_batch_through_model_backward_gives_zero_param_grads(chunk_size):
    model, batch = tiny_model(), padded_batch(rows=2)
    batch["labels"][:] = -100
    loss = causal_lm_loss(model(**batch), batch["labels"], chunk_size=chunk_size)
    loss.backward()
    assert loss.item() == 0.0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.grad, torch.zeros_like(p)), name


def test_nan_in_masked_position_does_not_leak_but_supervised_nan_shows():
    logits, labels = random_logits(), random_labels()
    with torch.no_grad():
        logits[0, 7] = float("nan")  # row 0 from position 4 on predicts nothing (labels 5: masked)
    chunked = causal_lm_loss(logits, labels, chunk_size=4)
    assert math.isfinite(chunked.item())
    assert torch.isfinite(grads(chunked, logits)).all()  # masked rows get exact zeros, not NaN*0
    assert math.isfinite(causal_lm_loss(logits, labels).item())
    with torch.no_grad():
        logits[1, 3] = float("nan")  # supervised: a real fault, must not be hidden
    assert math.isnan(causal_lm_loss(logits, labels, chunk_size=4).item())
    assert math.isnan(causal_lm_loss(logits, labels).item())


# --- gradient accumulation: four micro-batches == one batch of all their rows -----------------


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("mask_one_micro_batch", [False, True])
def test_grad_accumulation_equals_full_batch(chunk_size, mask_one_micro_batch):
    batch = padded_batch(rows=8)
    if mask_one_micro_batch:
        batch["labels"][2:4] = -100  # micro-batch 1 has nothing to learn from
    labels = batch["labels"]
    window_tokens = int((labels[:, 1:] != -100).sum())  # what the Trainer counts

    model = tiny_model()
    causal_lm_loss(model(**batch), labels, chunk_size=chunk_size).backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}

    model = tiny_model()
    micro_losses = []
    for i in range(4):
        mb = {k: v[2 * i : 2 * i + 2] for k, v in batch.items()}
        n = torch.tensor(window_tokens)  # a tensor, as the Trainer passes it
        loss = causal_lm_loss(model(**mb), mb["labels"], n, chunk_size=chunk_size)
        loss.backward()
        micro_losses.append(loss.item())
    assert all(math.isfinite(v) for v in micro_losses)
    if mask_one_micro_batch:
        assert micro_losses[1] == 0.0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[name], atol=1e-6, rtol=0, msg=name)


# --- precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_bf16_logits_equal_their_fp32_upcast(chunk_size):
    fp32 = random_logits()
    labels = random_labels()
    bf16 = fp32.detach().to(torch.bfloat16).requires_grad_(True)
    upcast = bf16.detach().float().requires_grad_(True)
    loss_bf16 = causal_lm_loss(bf16, labels, chunk_size=chunk_size)
    loss_upcast = causal_lm_loss(upcast, labels, chunk_size=chunk_size)
    assert loss_bf16.dtype == torch.float32
    assert abs(loss_bf16.item() - loss_upcast.item()) <= 1e-6  # computed in fp32 either way
    assert loss_bf16.item() == pytest.approx(causal_lm_loss(fp32, labels).item(), rel=1e-2)
    g_bf16, g_upcast = grads(loss_bf16, bf16), grads(loss_upcast, upcast)
    assert g_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(g_bf16.float(), g_upcast, atol=1e-3, rtol=1.6e-2)


def test_fp64_logits_are_not_downcast():
    logits = random_logits(dtype=torch.float64)
    for chunk_size in CHUNKS:
        assert causal_lm_loss(logits, random_labels(), chunk_size=chunk_size).dtype == torch.float64


# --- no host sync: the whole computation runs on the meta device (no values at all) ----------


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_no_host_sync_runs_on_meta_device(chunk_size):
    with pytest.raises(RuntimeError):
        bool(torch.ones((), device="meta"))  # meta forbids reading values on the host
    logits = torch.randn(2, 6, VOCAB, device="meta", requires_grad=True)
    labels = torch.zeros(2, 6, dtype=torch.long, device="meta")
    tracker = SafeCausalLMLoss(chunk_size=chunk_size, z_loss=1e-4)
    for n in (None, 7, torch.tensor(7, device="meta")):
        loss = tracker(logits, labels, n)
        loss.backward()
        assert loss.device.type == "meta" and logits.grad.shape == logits.shape
    w = tracker.window()
    assert w.mean_loss.device.type == "meta" and w.micro_batches == 3


# --- misuse: clear errors that name what was seen ----------------------------------------------


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 8\).*\(3, 9, 64\)"):
        causal_lm_loss(random_logits(), torch.zeros(3, 8, dtype=torch.long))


def test_labels_on_another_device_is_an_error():
    labels = torch.zeros(3, 9, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"meta.*cpu"):
        causal_lm_loss(random_logits(), labels)


def test_integer_logits_and_float_labels_are_type_errors():
    with pytest.raises(TypeError, match=r"torch.int64.*\(3, 9, 64\)"):
        causal_lm_loss(torch.zeros(3, 9, VOCAB, dtype=torch.long), random_labels())
    with pytest.raises(TypeError, match="integer token ids"):
        causal_lm_loss(random_logits(), random_labels().float())
    with pytest.raises(TypeError, match="logits"):
        causal_lm_loss((torch.tensor(1.0), random_logits()), random_labels())


def test_bad_arguments_are_rejected():
    logits, labels = random_logits(), random_labels()
    with pytest.raises(ValueError, match="chunk_size"):
        causal_lm_loss(logits, labels, chunk_size=0)
    with pytest.raises(ValueError, match=">= 0"):
        causal_lm_loss(logits, labels, -1)
    with pytest.raises(ValueError, match="single count"):
        causal_lm_loss(logits, labels, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="labels is None"):
        causal_lm_loss(logits, None)


# --- the recording wrapper ---------------------------------------------------------------------


def test_tracker_records_window_and_counts_empty_micro_batches():
    logits, labels = random_logits(), random_labels()
    empty = torch.full_like(labels, -100)
    tracker = SafeCausalLMLoss()
    n = torch.tensor(38)
    parts = causal_lm_loss_parts(logits, labels, n)
    loss = tracker(logits, labels, n)
    assert loss.item() == parts.loss.item() and loss.requires_grad
    assert tracker.last_num_tokens.item() == parts.num_tokens.item() == 19
    assert tracker.last_loss_sum.item() == pytest.approx(parts.loss_sum.item())
    assert not tracker.last_loss_sum.requires_grad
    assert tracker(logits, empty, n).item() == 0.0
    tracker(logits, labels, n)
    w = tracker.window()
    assert (w.micro_batches, w.empty_micro_batches.item(), w.num_tokens.item()) == (3, 1, 38)
    assert w.mean_loss.item() == pytest.approx(parts.loss_sum.item() / 19, rel=1e-6)
    with torch.no_grad():
        tracker(logits, labels, n)  # evaluation is not recorded
    read = tracker.read_and_reset()
    assert read["micro_batches"] == 3 and read["empty_micro_batches"] == 1
    assert read["num_tokens"] == 38 and read["num_items_in_batch"] == 38
    assert read["loss"] == pytest.approx(parts.loss_sum.item() / 19, rel=1e-6)
    assert tracker.window().micro_batches == 0  # reset
    tracker(logits, empty, 0)
    read = tracker.read_and_reset()  # an empty window is not a loss of 0.0
    assert read["loss"] is None and read["num_tokens"] == 0 and read["empty_micro_batches"] == 1


def test_tracker_window_keeps_a_nan_loss():
    logits, labels = random_logits(), random_labels()
    tracker = SafeCausalLMLoss(chunk_size=4)
    tracker(logits, labels)
    with torch.no_grad():
        logits[1, 3] = float("nan")
    tracker(logits, labels)
    assert math.isnan(tracker.window().mean_loss.item())
    assert math.isnan(tracker.read_and_reset()["loss"])


def test_trainer_compute_loss_func_empty_window_is_finite_and_counted(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    batch = padded_batch(rows=8)
    batch["labels"][0:2] = -100  # step 1: first micro-batch empty
    batch["labels"][4:8] = -100  # step 2: whole window empty (num_items_in_batch == 0)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    tracker = SafeCausalLMLoss()
    per_step = []

    class ReadEachStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            per_step.append(tracker.read_and_reset())

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=2, learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, train_sampling_strategy="sequential", disable_tqdm=True,
    )
    trainer = Trainer(
        model=tiny_model().train(), args=args, train_dataset=rows,
        compute_loss_func=tracker, callbacks=[ReadEachStep()],
    )
    trainer.train()
    step1_tokens = int((batch["labels"][2:4, 1:] != -100).sum())
    assert [s["micro_batches"] for s in per_step] == [2, 2]
    assert [s["empty_micro_batches"] for s in per_step] == [1, 2]
    assert per_step[0]["num_tokens"] == per_step[0]["num_items_in_batch"] == step1_tokens
    assert per_step[1]["num_tokens"] == 0 and per_step[1]["loss"] is None
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(v) for v in logged)
    assert logged[0] == pytest.approx(per_step[0]["loss"], abs=1e-3)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

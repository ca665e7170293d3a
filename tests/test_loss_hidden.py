"""causal_lm_loss_from_hidden and its Trainer wiring.

Reference everywhere: transformers' own causal-LM loss (``ForCausalLMLoss`` on the model's
logits, or the model's ``loss`` when called with labels), fp32, tolerance 1e-5. The fast path
must equal it in value and in every gradient (hidden states, head weight and bias, tied
embeddings, LoRA adapters), for Llama-, Gemma- (soft-capped logits) and Qwen-style models, with
gradient accumulation and a fully masked micro-batch; and keep causal_lm_loss's promises (an
exact 0.0 in the graph when nothing is supervised, NaN where a supervised value is NaN).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

from finitetune.loss.causal import causal_lm_loss, causal_lm_loss_from_hidden
from finitetune.loss.hidden import LMHead, LowRank

VOCAB, HID = 96, 32
TOL = dict(atol=1e-5, rtol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(rows: int = 4, seq: int = 12, seed: int = 1, vocab: int = VOCAB) -> dict:
    """Right-padded rows of different lengths, prompts masked; row 2 has nothing supervised."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (rows, seq), generator=g)
    attention_mask = torch.ones(rows, seq, dtype=torch.long)
    labels = input_ids.clone()
    labels[:, :5] = -100
    for r in range(rows):
        length = seq - (r % 3) * 2
        attention_mask[r, length:] = 0
        labels[r, length:] = -100
    labels[2 % rows] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def reference_head(hidden, weight, bias=None, scale=None, cap=None):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if scale is not None:
        logits = logits * scale
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return logits


# --- the function against transformers' loss ---------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
@pytest.mark.parametrize("post", [(None, None), (None, 3.0), (0.5, 2.0), (1.7, None)],
                         ids=["plain", "softcap", "scale+softcap", "scale"])
@pytest.mark.parametrize("num_items", [None, 23, "tensor"])
def test_values_and_all_gradients_equal_transformers(chunk_size, post, num_items):
    scale, cap = post
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, HID, requires_grad=True)
    head = torch.nn.Linear(HID, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.mul_(4)  # logits of several units: the soft-cap's tanh is far from linear
    labels = batch(3, 10)["labels"]
    n = torch.tensor(23) if num_items == "tensor" else num_items
    expected = ForCausalLMLoss(reference_head(hidden, head.weight, head.bias, scale, cap), labels,
                               VOCAB, num_items_in_batch=n)
    got = causal_lm_loss_from_hidden(hidden, head, labels, n, chunk_size=chunk_size,
                                     logit_softcap=cap, logit_scale=scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **TOL)
    wrt = [hidden, head.weight, head.bias]
    for a, b in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(expected, wrt)):
        torch.testing.assert_close(a, b, **TOL)


def test_z_loss_matches_the_logits_loss():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, HID, requires_grad=True)
    head = torch.nn.Linear(HID, VOCAB, bias=False)
    labels = batch(2, 9)["labels"]
    expected = causal_lm_loss(reference_head(hidden, head.weight, cap=5.0), labels, z_loss=1e-3)
    got = causal_lm_loss_from_hidden(hidden, head, labels, z_loss=1e-3, logit_softcap=5.0,
                                     chunk_size=3)
    torch.testing.assert_close(got, expected, **TOL)
    for a, b in zip(torch.autograd.grad(got, [hidden, head.weight]),
                    torch.autograd.grad(expected, [hidden, head.weight])):
        torch.testing.assert_close(a, b, **TOL)


def test_low_rank_head_equals_the_explicit_adapter():
    torch.manual_seed(0)
    hidden = torch.randn(2, 8, HID, requires_grad=True)
    w = torch.randn(VOCAB, HID, requires_grad=True)
    adapters = [(torch.randn(4, HID, requires_grad=True), torch.randn(VOCAB, 4, requires_grad=True),
                 0.5), (torch.randn(2, HID, requires_grad=True),
                        torch.randn(VOCAB, 2, requires_grad=True), 2.0)]
    labels = batch(2, 8)["labels"]
    logits = hidden @ w.T + sum((hidden @ a.T @ b.T) * s for a, b, s in adapters)
    expected = ForCausalLMLoss(logits, labels, VOCAB)
    spec = LMHead(w, None, tuple(LowRank(a, b, s) for a, b, s in adapters))
    got = causal_lm_loss_from_hidden(hidden, spec, labels, chunk_size=3)
    torch.testing.assert_close(got, expected, **TOL)
    wrt = [hidden, w] + [t for a, b, _ in adapters for t in (a, b)]
    for a, b in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(expected, wrt)):
        torch.testing.assert_close(a, b, **TOL)


def test_nothing_supervised_is_an_exact_zero_in_the_graph():
    # transformers gives NaN here (0 / 0); ours: 0.0, backward works, gradients exactly zero.
    hidden = torch.randn(2, 6, HID, requires_grad=True)
    head = torch.nn.Linear(HID, VOCAB)
    labels = torch.full((2, 6), -100)
    labels[:, 0] = 5  # only the first position is labelled: after the shift nothing is left
    assert math.isnan(ForCausalLMLoss(head(hidden), labels, VOCAB).item())
    loss = causal_lm_loss_from_hidden(hidden, head, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert hidden.grad.abs().sum().item() == 0.0
    assert head.weight.grad is not None and head.weight.grad.abs().sum().item() == 0.0


def test_nan_only_where_it_matters():
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, HID, requires_grad=True)
    head = torch.nn.Linear(HID, VOCAB)
    labels = torch.randint(0, VOCAB, (2, 6))
    labels[:, :3] = -100  # prompt: positions 0 and 1 predict masked labels
    poisoned = hidden.detach().clone()
    poisoned[0, 1] = float("nan")  # position 1 predicts masked label 2: never used
    clean = causal_lm_loss_from_hidden(hidden, head, labels)
    assert causal_lm_loss_from_hidden(poisoned, head, labels).item() == clean.item()
    poisoned[0, 2] = float("nan")  # position 2 predicts the supervised label 3
    assert math.isnan(causal_lm_loss_from_hidden(poisoned, head, labels).item())


class _LargestLogits(TorchDispatchMode):
    """Largest number of rows of any (rows, VOCAB) tensor an op produces (views of the head's
    weight, such as its transpose, do not count)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.rows = 0
        self.weight_storage = weight.untyped_storage().data_ptr()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == VOCAB
                    and t.untyped_storage().data_ptr() != self.weight_storage):
                self.rows = max(self.rows, t.shape[0])
        return out


def test_never_more_than_one_chunk_of_logits_in_forward_or_backward():
    torch.manual_seed(0)
    hidden = torch.randn(4, 30, HID, requires_grad=True)  # 4 x 29 = 116 supervised rows
    head = torch.nn.Linear(HID, VOCAB)
    labels = torch.randint(0, VOCAB, (4, 30))
    with _LargestLogits(head.weight) as seen:
        causal_lm_loss_from_hidden(hidden, head, labels, chunk_size=8,
                                   logit_softcap=2.0).backward()
    assert seen.rows == 8
    with _LargestLogits(head.weight) as full:  # the check itself sees full logits where they exist
        causal_lm_loss(head(hidden), labels).backward()
    assert full.rows == 4 * 30


def test_bf16_weights_compute_the_softmax_in_fp32():
    torch.manual_seed(0)
    hidden = torch.randn(2, 16, HID)
    head = torch.nn.Linear(HID, VOCAB, bias=False)
    labels = torch.randint(0, VOCAB, (2, 16))
    ref = causal_lm_loss(head(hidden).double(), labels)
    h16 = hidden.bfloat16().requires_grad_(True)
    got = causal_lm_loss_from_hidden(h16, head.bfloat16(), labels, chunk_size=5)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 2e-2
    got.backward()
    assert h16.grad.dtype == torch.bfloat16 and torch.isfinite(h16.grad).all()


@pytest.mark.parametrize("bad, match", [
    (dict(labels=torch.zeros(2, 5, dtype=torch.long)), "shape"),
    (dict(labels=torch.zeros(2, 6)), "integer"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(logit_softcap=0.0), "logit_softcap"),
    (dict(lm_head=torch.nn.Sequential(torch.nn.Linear(HID, VOCAB))), "nn.Linear"),
    (dict(lm_head=torch.nn.Linear(HID + 1, VOCAB)), "does not fit"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(hidden_states=torch.randn(2, 6, HID), lm_head=torch.nn.Linear(HID, VOCAB),
                labels=torch.zeros(2, 6, dtype=torch.long))
    args.update({k: v for k, v in bad.items() if k in args})
    opts = {k: v for k, v in bad.items() if k not in args}
    with pytest.raises((TypeError, ValueError), match=match):
        causal_lm_loss_from_hidden(args["hidden_states"], args["lm_head"], args["labels"], **opts)


def test_shift_labels_are_used_as_given():
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, HID)
    head = torch.nn.Linear(HID, VOCAB)
    labels = batch(2, 7)["labels"]
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    a = causal_lm_loss_from_hidden(hidden, head, None, shift_labels=shifted)
    b = causal_lm_loss_from_hidden(hidden, head, labels)
    assert a.item() == b.item()

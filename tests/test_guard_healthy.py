"""A healthy run stays a healthy run: the spike rules never skip a step of ordinary variance.

What ordinary variance looks like was measured (``bench/bench_stability.py --healthy``): the
last window of an epoch whose size the batch does not divide holds fewer tokens, so its mean
loss and its gradient norm are noisier (norms 2-13x the full windows'); and a training run on
random tokens has full-window grad-norm spikes of 10-15x while its loss stays flat. Neither may
skip a step; a real spike (the loss x100, a diverging learning rate) still does (those are in
``test_guard_core.py``, ``test_guard_hf.py`` and ``finitetune verify``'s ``lr_divergence``).
"""

import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

from finitetune import GuardCallback, GuardConfig
from finitetune.guard.policy import (
    Action,
    PolicyContext,
    Reason,
    Signals,
    SpikeDetector,
    StepStats,
    decide,
)
from finitetune.integrations.hf.callback import guard_of
from finitetune.testing import assert_same_state
from finitetune.testing import models as testing_models

VOCAB, SEQ = 64, 16

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int, seed: int) -> list[dict]:
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": r, "labels": r} for r in ids]


def _trainer(out, rows, callbacks=()) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out), num_train_epochs=30, per_device_train_batch_size=4,
        gradient_accumulation_steps=3, learning_rate=3e-3, warmup_steps=12,
        lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=10, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    model = testing_models.tiny_llama(vocab=VOCAB, kv_heads=2, positions=SEQ, seed=3)
    return Trainer(model=model, args=args, train_dataset=rows, callbacks=list(callbacks))


def test_a_partial_last_window_every_epoch_skips_nothing_and_equals_the_plain_trainer(tmp_path):
    # Healthy run: 37 random-token rows, batch 4, accumulation 3, 30 epochs. Every epoch ends
    # with a window of one 1-row micro-batch (15 tokens instead of 180), whose norm is several
    # times the others'. Must: all 120 steps applied, no skip event, and the final parameters
    # and optimizer state bit-identical to the same Trainer without the guard.
    rows = _rows(37, seed=11)
    g = _trainer(tmp_path / "g", rows, [GuardCallback()])
    g.train()
    counters = guard_of(g).counters
    assert g.state.global_step == 120
    assert (counters["applied"], counters["skipped"]) == (120, 0)
    plain = _trainer(tmp_path / "plain", rows)
    plain.train()
    assert_same_state(g.model, plain.model, g.optimizer, plain.optimizer, g.lr_scheduler,
                      plain.lr_scheduler)


def _filled(kind: str, values: list[float], tokens: list[int]) -> SpikeDetector:
    det = SpikeDetector(window=50, warmup=20, min_scale=0.02, kind=kind)
    for v, n in zip(values, tokens, strict=True):
        det.push(v, n)
    return det


def test_a_window_with_fewer_tokens_is_judged_for_its_size():
    # Measured shape (random tokens, batch 4, accumulation 2): full windows hold ~44 tokens
    # with norms ~1.8 +- 0.2; the partial window holds 5 tokens and its norm is ~5.
    # Must: that norm is not a spike at 5 tokens (sqrt(44/5) = 2.97x leeway), but the same norm
    # in a full window is; the low side is judged on the raw value; a loss over 5 tokens gets
    # a spread sqrt(44/5) times wider; without token counts nothing changes.
    norms = [1.8 + 0.2 * math.sin(i) for i in range(30)]
    det = _filled("norm", norms, [44] * 30)
    assert det.size_ratio(5) == pytest.approx(44 / 5)
    assert det.score(5.0, tokens=5) < 10 < det.score(5.0, tokens=44)
    assert det.score(5.0) == det.score(5.0, tokens=44)  # unknown count: as before
    assert det.score(0.2, tokens=5) == det.score(0.2, tokens=44) < -5  # low side: raw value
    losses = _filled("loss", [2.6 + 0.05 * math.sin(i) for i in range(30)], [44] * 30)
    z_full, z_small = losses.score(3.5, tokens=44), losses.score(3.5, tokens=5)
    assert z_small == pytest.approx(z_full / math.sqrt(44 / 5))


def test_a_grad_spike_with_a_flat_loss_warns_and_one_with_a_rising_loss_acts():
    # Measured: healthy random-token runs have full-window norm spikes of z 12-53 while the
    # loss z stays in [-2.4, -0.2]; verify's lr_divergence spike has norm z 14.5 with loss
    # z 5.7. Must: the first is a warning (applied, marked statistical), the second follows
    # spike_action; with no loss observed the norm alone decides (as before);
    # spike_confirm=False acts on every norm spike.
    stats = StepStats(grad_norm=20.0, loss=2.5, tokens=44, micro_batches=2)
    ctx = PolicyContext(has_snapshot=True)
    flat = decide(stats, Signals(loss_z=-0.5, grad_z=20.0), ctx, GuardConfig())
    assert (flat.action, flat.reason, flat.detail["statistical"]) == (
        Action.APPLY, Reason.GRAD_SPIKE, True)
    rising = decide(stats, Signals(loss_z=5.7, grad_z=14.5), ctx, GuardConfig())
    assert (rising.action, rising.reason) == (Action.SKIP, Reason.GRAD_SPIKE)
    no_loss = decide(stats, Signals(grad_z=20.0), ctx, GuardConfig(spike_action="rollback"))
    assert no_loss.action == Action.ROLLBACK
    always = decide(stats, Signals(loss_z=-0.5, grad_z=20.0), ctx,
                    GuardConfig(spike_confirm=False))
    assert always.action == Action.SKIP


def test_a_hard_batch_below_the_starting_loss_warns_and_a_loss_above_it_acts():
    # A classification fine-tune near the end: losses ~0.05, a batch with a few examples the
    # model still gets wrong has loss 1.1 (z far above 10), the run started at 5.7. Must: a
    # warning (applied, statistical), since the run's start shows a loss like that needs no
    # fault; a loss x100 of the median (above the start) follows spike_action, as does any
    # spike with spike_confirm=False; the tracker learns the start from the first
    # spike_warmup applied losses and keeps it in its state.
    from finitetune.guard.signals import SignalTracker

    cfg = GuardConfig(spike_warmup=5, spike_window=20)
    tracker = SignalTracker(cfg)
    start = [5.7, 4.1, 3.2, 2.0, 1.1]
    late = [0.05 + 0.01 * math.sin(i) for i in range(15)]
    for v in start + late:
        s = StepStats(grad_norm=1.0, loss=v, tokens=16, micro_batches=1)
        tracker.accept(s, tracker.read(s, 1.0))
    assert tracker.loss_start == 5.7 and tracker.state_dict()["loss_start"] == 5.7
    ctx = PolicyContext(has_snapshot=True)
    hard = StepStats(grad_norm=1.0, loss=1.1, tokens=16, micro_batches=1)
    signals = tracker.read(hard, 1.0)
    assert signals.loss_z > 10 and signals.loss_above_start is False
    d = decide(hard, signals, ctx, cfg)
    assert (d.action, d.reason, d.detail["statistical"]) == (Action.APPLY, Reason.LOSS_SPIKE, True)
    bad = StepStats(grad_norm=1.0, loss=6.0, tokens=16, micro_batches=1)
    assert decide(bad, tracker.read(bad, 1.0), ctx, cfg).action == Action.SKIP
    strict = GuardConfig(spike_warmup=5, spike_window=20, spike_confirm=False)
    assert decide(hard, signals, ctx, strict).action == Action.SKIP

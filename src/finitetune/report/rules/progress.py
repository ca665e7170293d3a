"""Rules for a run that is finite but not training: the first loss, the learning rate, losses
and norms stuck at one value, spikes, and a loss that does not fall (or climbs at the end)."""

from __future__ import annotations

import itertools
import math
from typing import Any

from finitetune.report.rules.base import (
    Context,
    Opt,
    finding,
    finite,
    fmt,
    persistent,
    runs,
    where,
)
from finitetune.report.stats import trend_word

STUCK_PATIENCE = 3
"""Consecutive entries of loss exactly 0.0 (or grad norm 0.0) before it counts as stuck."""
PIN_PATIENCE = 5
"""Consecutive identical grad norms before the norm counts as pinned."""
CONVERGED_DESCENT = 10.0
"""A loss that fell at least this many times before reaching 0.0 has converged (with finite,
shrinking grad norms): the rounding of a tiny loss, not a broken one."""
LATE_RISE = 0.10
"""A loss whose last quarter rises (strong evidence) by at least 10 % is diverging."""


def first_loss(c: Context) -> list[dict[str, Any]]:
    first = next(((s, v) for s, v in zip(c.steps, c.loss, strict=True)
                  if v is not None and finite(v) and v != 0.0), None)  # 0.0: hidden NaN?
    if first is None or first[1] <= c.loss_bound:
        return []
    assumed = " (vocabulary size assumed; pass --vocab-size)" if c.vocab_assumed else ""
    return [finding(
        "implausible_first_loss", "critical",
        f"First loss {first[1]:.4g} is implausible for a token-mean cross-entropy "
        f"(> ln(vocab) + margin = {c.loss_bound:.3g}{assumed})",
        "A mean over tokens starts near ln(vocab) for an untrained head and far below for a "
        "pretrained one. Losses in the thousands mean the loss is summed, not averaged, the "
        "labels are misaligned, the vocabulary is wrong, or a batch is corrupt.",
        "loss reduction (mean over supervised tokens), label shifting, tokenizer vs model "
        "vocabulary size, the first batch.", [first[0]])]


def zero_lr(c: Context) -> list[dict[str, Any]]:
    have = [i for i, v in enumerate(c.lr) if finite(v)]
    zeros = [i for i in have if c.lr[i] == 0.0]
    if not zeros:
        return []
    steps = [c.steps[i] for i in zeros]
    if len(zeros) == len(have):
        return [finding("zero_lr", "critical", "Learning rate is 0.0 on every logged entry",
                        "With a zero learning rate no update changes the weights.",
                        "learning_rate, the scheduler and its warm-up/decay steps.", steps)]
    # a linear warm-up starts at exactly 0 and a decaying schedule ends there: one entry each
    if set(zeros) <= {have[0], have[-1]}:
        where = "first entry (start of a warm-up)" if zeros == have[:1] else (
            "last entry (end of a decaying schedule)" if zeros == have[-1:] else
            "first and last entries (warm-up start, schedule end)")
        return [finding("zero_lr", "info", f"Learning rate 0.0 on the {where}", steps=steps)]
    return [finding(
        "zero_lr", "warning",
        f"Learning rate 0.0 during training ({len(zeros)} of {len(have)} entries, first "
        f"at step {fmt(steps[0])})",
        "Steps at a zero learning rate change nothing: the schedule ended before "
        "training did, or it is misconfigured.",
        "max_steps vs the scheduler's total steps, warm-up length, resumed schedules.", steps)]


def _stuck(values: list[Opt], flags: list[bool]) -> tuple[int, int] | None:
    """The longest run of ``flags`` that is long enough, or the one that reaches the end."""
    have = sum(1 for v in values if v is not None)
    found = [r for r in runs(flags) if r[1] - r[0] + 1 >= min(STUCK_PATIENCE, have)]
    if not found:
        return None
    return max(found, key=lambda r: (r[1] == len(flags) - 1, r[1] - r[0]))


def zero_loss(c: Context) -> list[dict[str, Any]]:
    """Loss exactly 0.0 on consecutive entries whose grad norm is finite or not logged (with a
    NaN grad norm, or a NaN eval_loss, it is the hidden-NaN rule's)."""
    if c.eval_bad_steps():
        return []
    flags = [v == 0.0 and (g is None or math.isfinite(g))
             for v, g in zip(c.loss, c.grad, strict=True)]
    run = _stuck(c.loss, flags)
    if run is None:
        return []
    a, b = run
    grads = [c.grad[i] for i in range(a, b + 1)]
    logged = [g for g in grads if g is not None]
    if not logged:
        norms = "; grad norm not logged"
    elif all(g == 0.0 for g in logged):
        norms = " and grad norm exactly 0.0 (nothing is supervised)"
    elif len(logged) == len(grads):
        norms = " with finite grad norms"
    else:
        norms = f"; grad norm finite on {len(logged)} of them, not logged on the rest"
    converged = _converged(c, a, b)
    if converged:
        return [converged]
    return [finding(
        "zero_loss", "critical" if b == len(flags) - 1 else "warning",
        f"Loss stuck at exactly 0.0 on {b - a + 1} consecutive entries "
        f"(steps {fmt(c.steps[a])}–{fmt(c.steps[b])}){norms}",
        "A real cross-entropy is never exactly 0. A batch whose labels are all -100 has a NaN "
        "loss and zero gradient, which the Trainer's NaN filter prints as 0.0; a collapsed "
        "model or a communication bug (DeepSpeed) gives the same picture.",
        "labels (`finitetune check`), the template's response marker, truncation; rerun with "
        "logging_nan_inf_filter=False to see whether the loss is really NaN.",
        [c.steps[a], c.steps[b]])]


def _converged(c: Context, a: int, b: int) -> dict[str, Any] | None:
    """Entries ``a``-``b`` (loss 0.0) as a converged run: the loss fell at least
    :data:`CONVERGED_DESCENT` times before them, and their grad norms are all logged, finite,
    non-zero and below the earlier ones. Loggers round (transformers 4.x: 4 digits), so a
    memorised training set prints 0.0; that is worth a warning (overfitting), not "broken".
    A NaN or exactly 0 grad norm stays the broken case (hidden NaN, nothing supervised)."""
    logged = c.grad[a:b + 1]
    if any(g is None or not finite(g) or g <= 0 for g in logged):
        return None
    norms = [float(g or 0.0) for g in logged]
    before = [(v, g) for v, g in zip(c.loss[:a], c.grad[:a], strict=True)
              if v is not None and finite(v) and v > 0]
    earlier_norms = sorted(g for _, g in before if g is not None and finite(g) and g > 0)
    if len(before) < 3 or not earlier_norms:
        return None
    fell = before[0][0] / before[-1][0]
    shrinking = max(norms) < earlier_norms[len(earlier_norms) // 2]
    if fell < CONVERGED_DESCENT or not shrinking:
        return None
    return finding(
        "loss_converged_zero", "warning",
        f"Loss reached 0.0 on {b - a + 1} consecutive entries (steps {fmt(c.steps[a])}–"
        f"{fmt(c.steps[b])}) after falling from {before[0][0]:.4g} to {before[-1][0]:.4g}, "
        f"with finite, shrinking grad norms (last {norms[-1]:.3g}): converged",
        "The logger rounds the loss (transformers 4.x to 4 digits), so a model that fits its "
        "training data almost exactly prints 0.0. The finite, shrinking gradient says the "
        "updates are real and small; nothing is broken, but a loss this low usually means "
        "the model memorises the training set.",
        "an evaluation on held-out data (eval_loss, exact match) for overfitting; fewer steps "
        "or a lower learning rate if it does not generalise.", [c.steps[a], c.steps[b]])


def zero_grad(c: Context) -> list[dict[str, Any]]:
    flags = [g == 0.0 and finite(v) and v != 0.0 for v, g in zip(c.loss, c.grad, strict=True)]
    run = _stuck(c.grad, flags)
    if run is None:
        return []
    a, b = run
    return [finding(
        "zero_grad_norm", "critical" if b == len(flags) - 1 else "warning",
        f"Grad norm exactly 0.0 with a non-zero loss on {b - a + 1} consecutive entries",
        "No gradient reaches the trainable parameters.",
        "requires_grad of the parameters, LoRA target modules, a loss detached from the graph.",
        [c.steps[a], c.steps[b]])]


def pinned_norm(c: Context) -> list[dict[str, Any]]:
    g = c.grad
    clip = c.clip
    if clip:
        flags = [x is not None and finite(x) and abs(x - clip) <= 1e-6 * clip for x in g]
        what = f"at max_grad_norm = {clip:g}"
    else:
        same = [False, *(b is not None and b == a and b != 0.0 and math.isfinite(b)
                         for a, b in itertools.pairwise(g))]
        flags = [x or y for x, y in zip(same, [*same[1:], False])]
        what = "at one constant value"
    found = [r for r in runs(flags) if r[1] - r[0] + 1 >= PIN_PATIENCE]
    if not found:
        return []
    a, b = max(found, key=lambda r: r[1] - r[0])
    return [finding(
        "pinned_grad_norm", "warning",
        f"Grad norm pinned {what} ({g[a]:.4g}) on {b - a + 1} consecutive entries",
        "A pre-clip norm does not sit on one value: the logged norm is post-clip (a logging or "
        "DeepSpeed communication bug) or the model has collapsed.",
        "which norm is logged, the loss of those steps, clipping settings.",
        [c.steps[a], c.steps[b]])]


def trend(c: Context) -> list[dict[str, Any]]:
    """A loss that does not fall over the run (tested on 5 or more points), or that climbs at
    its end."""
    t = c.trend
    if all(v == 0.0 for v in c.loss if finite(v)):
        return []
    out = []
    if t.direction == "none":
        out.append(finding(
            "loss_not_decreasing", "warning",
            f"Loss shows no significant trend over {t.n} points (Theil–Sen slope "
            f"{t.slope:.3g}/step, 95 % interval [{t.ci_low:.3g}, {t.ci_high:.3g}] includes 0)",
            "Nothing in these points shows the loss falling: either the model does not learn, "
            "or the log is too noisy or too short to show it.",
            "learning rate (too low: no change; too high: noise), frozen parameters, labels; "
            "more logged steps (logging_steps) to see a trend."))
    elif t.direction in ("flat", "increasing") and t.evidence == "strong":
        out.append(finding(
            "loss_not_decreasing", "warning",
            f"Loss is {trend_word(t)}, not decreasing (Theil–Sen slope {t.slope:.3g}/step, "
            f"significant over {t.n} points)",
            "A fine-tune whose loss does not fall over the run is not learning.",
            "learning rate (too low: flat; too high: rising), frozen parameters, labels."))
    tail = t.tail
    if (tail is not None and t.direction != "increasing" and tail.direction == "increasing"
            and tail.evidence == "strong" and tail.first and tail.last is not None
            and tail.last >= (1 + LATE_RISE) * tail.first):
        out.append(finding(
            "loss_rising_late", "warning",
            f"Loss rising over the last {tail.n} entries: from {tail.first:.4g} at step "
            f"{fmt(tail.first_step or 0)} to {tail.last:.4g} at step {fmt(tail.last_step or 0)}",
            "A loss that climbs after falling or staying flat is diverging: the learning rate "
            "is too high for this stage, or bad batches pushed the weights away.",
            "learning rate and warm-up, grad-norm spikes before the rise, the batches there.",
            [tail.first_step or 0, tail.last_step or 0]))
    return out


def loss_scale_zero(c: Context) -> list[dict[str, Any]]:
    """An fp16 loss scale of 0 (printed by insightface, Megatron, fairseq as ``loss_scale``)."""
    have = [i for i, r in enumerate(c.log.records) if finite(r.get("loss_scale"))]
    zeros = [i for i in have if c.log.records[i]["loss_scale"] == 0.0]
    if not zeros:
        return []
    return [finding(
        "loss_scale_zero", "critical" if persistent(zeros, have) else "warning",
        f"fp16 loss scale is 0 on {where(zeros, have, c.steps)}",
        "The scaler halves the scale on every overflow; at 0 every gradient is multiplied by 0 "
        "and unscaling divides by 0, so nothing trains and NaN follows. The gradients overflow "
        "fp16 whatever the scale.",
        "bf16 or fp32 instead of fp16; the layer whose activations overflow first.",
        [c.steps[i] for i in zeros])]

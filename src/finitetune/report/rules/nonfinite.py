"""Rules for NaN and inf: hidden NaN losses, visible NaN losses, non-finite grad norms, evals.

The order of evidence matters: a loss of exactly 0.0 is a NaN the Trainer's
``logging_nan_inf_filter`` hid when the same entry's grad norm is NaN/inf, or when
``eval_loss`` is NaN/inf while training prints 0.0. The first non-finite entry of a NaN that
never ends is its onset, not fp16 calibration: calibration is a few early skips after which
the grad norm is finite again.
"""

from __future__ import annotations

import math
from typing import Any

from finitetune.report.rules.base import (
    PERSIST_RUN,
    Context,
    bad,
    finding,
    finite,
    fmt,
    persistent,
    tail_run,
    where,
)

CALIBRATION_SHARE = 0.1
"""fp16 GradScaler calibration: skips within the first 10 % of entries, then finite norms."""

_PRECISION_CHECK = ("precision (bf16 or fp32), the first non-finite parameter (finitetune's guard "
                    "names it and replays the step in fp32 to tell precision from data).")


def hidden_nan_loss(c: Context) -> list[dict[str, Any]]:
    """Loss exactly 0.0 with a NaN/inf grad norm on the same entry, or while eval_loss is
    NaN/inf (the Trainer's NaN filter prints a window of NaN losses as 0.0). Critical when it
    persists or when the log ends in it; a warning when the run recovered."""
    have = [i for i in range(len(c.steps)) if c.loss[i] is not None or c.grad[i] is not None]
    by_grad = [i for i in have if c.loss[i] == 0.0 and bad(c.grad[i])]
    eval_bad = c.eval_bad_steps()
    by_eval = ([i for i in have if c.loss[i] == 0.0 and not (finite(c.grad[i]) and c.grad[i])]
               if eval_bad else [])
    hits = sorted(set(by_grad) | set(by_eval))
    if not hits:
        return []
    broken = sorted(set(hits) | {i for i in have if bad(c.grad[i]) or bad(c.loss[i])})
    # The log ending in a hidden NaN is critical even before it persists: a whole logging
    # window of NaN losses with NaN gradients is not a loss-scaler skip, and a NaN step that was
    # applied has made the weights NaN. A hidden NaN the run recovered from is a warning.
    ends_in_it = have[-1] in hits
    severity = "critical" if persistent(broken, have) or ends_in_it else "warning"
    evidence = []
    if by_grad:
        evidence.append("a NaN/inf grad norm" + ("" if len(by_grad) == len(hits)
                                                 else f" on {len(by_grad)} of them"))
    if by_eval:
        evidence.append(f"eval_loss NaN/inf on {len(eval_bad)} evaluation(s)")
    return [finding(
        "hidden_nan_loss", severity,
        f"Hidden NaN loss: loss exactly 0.0 on {where(hits, have, c.steps)}, with "
        + " and ".join(evidence),
        "Transformers' Trainer, with logging_nan_inf_filter on (the default), replaces a NaN or "
        "inf loss by the mean of the window's earlier losses; a window of only NaN losses "
        "prints 0.0. The grad norm and the evaluation show what the logged loss hides: the "
        "real loss is NaN, and with clipping a NaN norm makes every weight NaN in one step.",
        "masked labels (a batch whose labels are all -100 gives 0/0: run `finitetune check`), "
        "precision (fp16 overflow: try bf16 or fp32), a non-finite weight or input; rerun with "
        "logging_nan_inf_filter=False to see the raw loss, or train with finitetune's guard.",
        [c.steps[i] for i in hits])]


def nan_loss(c: Context) -> list[dict[str, Any]]:
    """The logged loss itself is NaN/inf."""
    have = [i for i, v in enumerate(c.loss) if v is not None]
    hits = [i for i in have if bad(c.loss[i])]
    if not hits:
        return []
    lasting = persistent(hits, have)
    if lasting:
        title = (f"Non-finite loss from step {fmt(c.steps[_onset(hits, have)])} through the "
                 f"last entry ({where(hits, have, c.steps)})")
    else:
        title = f"Non-finite loss on {where(hits, have, c.steps)}"
    return [finding(
        "nan_loss", "critical" if lasting else "warning", title,
        "A NaN loss from the first step usually means a batch with no supervised token (all "
        "labels -100: mean over 0 tokens), a response marker the template did not find, or "
        "truncation that cut the response; later, an overflow or a diverging update.",
        "label validation (`finitetune check`), max_length vs response length, precision, LR.",
        [c.steps[i] for i in hits])]


def _onset(hits: list[int], among: list[int]) -> int:
    """First entry of the run of ``hits`` that reaches the end of ``among``."""
    return among[len(among) - tail_run(hits, among)]


def nonfinite_grad(c: Context) -> list[dict[str, Any]]:
    """NaN/inf grad norm where the loss is finite and non-zero, or not logged (entries with
    loss 0.0 are the hidden-NaN rule's)."""
    have = [i for i, v in enumerate(c.grad) if v is not None]
    bad_all = [i for i in have if bad(c.grad[i])]
    hits = [i for i in bad_all if c.loss[i] is None or (finite(c.loss[i]) and c.loss[i] != 0.0)]
    if not hits:
        return []
    steps = [c.steps[i] for i in hits]
    n = where(hits, have, c.steps)
    no_loss = all(c.loss[i] is None for i in have)
    what = "grad norm" if no_loss else "grad norm with a finite loss"
    unlogged = "; loss not logged" if no_loss else ""
    if persistent(bad_all, have):
        onset = _onset(bad_all, have)
        tail = have[len(have) - tail_run(bad_all, have):]
        if onset in hits and any(i not in hits for i in tail):  # then loss 0.0 or NaN
            title = (f"Grad norm NaN/inf from step {fmt(c.steps[onset])} through the last entry "
                     f"({tail_run(bad_all, have)} entries in a row): the onset, with the loss "
                     f"still finite ({c.loss[onset]:.4g}); every later entry is broken too")
        else:
            title = f"Persistent non-finite {what} on {n}{unlogged}"
        return [finding(
            "nonfinite_grad", "critical", title,
            "The forward pass is finite but the backward pass overflows: fp16's range ends at "
            "65504 (T5, Gemma, Qwen, MoE models are known to exceed it), or a bad kernel or "
            "input; once a NaN step is applied, every later step is NaN as well.",
            _PRECISION_CHECK, steps)]
    early = max(2, math.ceil(CALIBRATION_SHARE * len(have)))
    if all(have.index(i) < early for i in hits) and finite(c.grad[have[-1]]):
        return [finding(
            "loss_scale_calibration", "info",
            f"Non-finite {what} early on only, finite afterwards: {n}{unlogged}; the pattern "
            "of fp16 loss-scale calibration",
            "GradScaler starts with a large scale and halves it on each overflow, skipping that "
            "step: a few skips at the start are normal.", "", steps)]
    tail_len = tail_run(bad_all, have)
    if tail_len and tail_len == len(bad_all):  # only at the end, fewer than PERSIST_RUN in a row
        last = "the last entry" if tail_len == 1 else f"the last {tail_len} entries"
        title = (f"Non-finite {what} on {last} (of {len(have)}){unlogged}; fewer than "
                 f"{PERSIST_RUN} in a row, so not called persistent")
    elif len(hits) == 1:
        title = f"Non-finite {what} on one entry: {n}{unlogged}"
    else:
        title = f"Intermittent non-finite {what} ({n}){unlogged}"
    return [finding(
        "fp16_skip_pattern" if len(hits) > 1 and not tail_len else "nonfinite_grad", "warning", title,
        "With fp16 the GradScaler skips a step whose gradients overflow and lowers its scale; "
        "the logged norm is NaN/inf while the loss stays finite. Rare skips are harmless; "
        "skips that keep coming mean the gradients overflow fp16 itself. Without fp16, a "
        "non-finite norm is a real fault of that step.",
        "how often it recurs; bf16 instead of fp16 where the hardware has it.", steps)]


def eval_nonfinite(c: Context) -> list[dict[str, Any]]:
    """eval_loss NaN/inf in the log's evaluations or in finitetune's eval.json."""
    out = []
    after = (c.log.eval or {}).get("after")
    if isinstance(after, dict):
        for key, a in after.items():
            if key.endswith("loss") and bad(a):
                out.append(finding("eval_nonfinite", "warning", f"{key} after training is {a}"))
    bad_steps = c.eval_bad_steps()
    if bad_steps:
        out.append(finding(
            "eval_nonfinite", "warning",
            f"eval_loss is NaN/inf on {len(bad_steps)} of {len(c.log.evals)} evaluation(s)",
            "Evaluation runs the model without the training loop's loss scaling: fp16 evaluation "
            "overflows first (fp16_full_eval, T5-style models), and a model whose weights went "
            "NaN gives NaN everywhere. An eval batch without supervised tokens gives 0/0.",
            "the training loss around those steps, precision of evaluation, eval labels.",
            steps=bad_steps))
    return out

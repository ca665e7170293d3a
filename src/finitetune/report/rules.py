"""Diagnosis rules: the failure catalogue of DESIGN.md §3, applied to a parsed log.

Each rule looks for one symptom and, when it fires, says what usually causes it and what to
check. Severity decides the verdict: ``critical`` makes a run unhealthy (exit 1), ``warning``
fails only ``--strict``, ``info`` is noted. "Persistent" means the pattern reaches the last
logged entry or covers most entries: a run that ends broken is broken, however it started.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from finitetune.report.parse import ParsedLog, is_accuracy
from finitetune.report.run_status import run_status_findings

STUCK_PATIENCE = 3
"""Consecutive entries of loss exactly 0.0 (or grad norm 0.0) before it counts as stuck."""
PIN_PATIENCE = 5
"""Consecutive identical grad norms before the norm counts as pinned."""
SPIKE_Z = 6.0
"""Robust z-score (MAD units, on log grad norm) of a noted spike; also >= 10x the median."""

Opt = float | None


@dataclass
class Context:
    steps: list[float]
    loss: list[Opt]
    grad: list[Opt]
    lr: list[Opt]
    log: ParsedLog
    trend: Any
    loss_bound: float
    vocab_assumed: bool
    clip: float | None


def _finite(x: Opt) -> bool:
    return x is not None and math.isfinite(x)


def _bad(x: Opt) -> bool:
    return x is not None and not math.isfinite(x)


def _fmt(x: float) -> str:
    return f"{int(x)}" if float(x).is_integer() else f"{x:.4g}"


def _f(rule: str, severity: str, title: str, detail: str = "", check: str = "",
       steps: list[float] | None = None) -> dict[str, Any]:
    return {"rule": rule, "severity": severity, "title": title, "detail": detail,
            "check": check, "steps": list(steps or [])[:20]}


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """(start, end) index pairs, end inclusive, of consecutive True values."""
    out, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            out.append((start, i - 1))
            start = None
    return out


def _persistent(hits: list[int], among: list[int]) -> bool:
    """The pattern is on the last entry that has the metric, or on most of them."""
    return bool(hits) and (hits[-1] == among[-1] or len(hits) > len(among) / 2)


# symptoms that the guard handles by not applying the step (skip, rollback, lower LR)
_HANDLED_RULES = {"hidden_nan_loss", "nan_loss", "nonfinite_grad", "fp16_skip_pattern",
                  "loss_scale_calibration", "zero_loss"}
_HANDLING_ACTIONS = {"skip", "rollback", "reduce_lr"}


def diagnose(c: Context) -> list[dict[str, Any]]:
    """Run every rule; return the findings as dicts (see health.Finding).

    In a guarded run a symptom that appears only on entries where the guard did not apply the
    step (its events, or a metrics line with ``skipped`` > 0) was handled: it becomes ``info``
    ("handled by the guard") instead of a warning or a wrong fp16 diagnosis. A symptom on any
    other entry keeps its severity.
    """
    out: list[dict[str, Any]] = []
    for rule in (_hidden_nan_loss, _nan_loss, _nonfinite_grad, _first_loss, _zero_lr,
                 _zero_loss, _zero_grad, _pinned_norm, _spikes, _trend, _guard, _eval, _labels,
                 _empty, run_status_findings):
        out.extend(rule(c))
    handled = _handled_steps(c)
    for finding in out:
        if (handled and finding["rule"] in _HANDLED_RULES and finding["steps"]
                and set(finding["steps"]) <= handled):
            finding["severity"] = "info"
            finding["title"] = f"Handled by the guard: {finding['title']}"
            finding["check"] = "the guard's events (`finitetune explain`) say what it did"
    return out


def _handled_steps(c: Context) -> set[float]:
    steps = {e["step"] for e in c.log.events
             if isinstance(e.get("step"), (int, float))
             and str(e.get("action") or "").lower() in _HANDLING_ACTIONS}
    steps |= {r["step"] for r in c.log.records
              if isinstance(r.get("step"), (int, float)) and (r.get("skipped") or 0) > 0}
    return steps


def _hidden_nan_loss(c: Context) -> list[dict[str, Any]]:
    both = [i for i in range(len(c.steps)) if c.loss[i] is not None and c.grad[i] is not None]
    hits = [i for i in both if c.loss[i] == 0.0 and _bad(c.grad[i])]
    if not hits:
        return []
    persistent = _persistent(hits, both)
    where = ("every logged entry" if len(hits) == len(both)
             else f"{len(hits)} of {len(both)} entries")
    return [_f(
        "hidden_nan_loss", "critical" if persistent else "warning",
        f"Hidden NaN loss: loss 0.0 with a NaN grad norm on {where}",
        "Transformers' Trainer, with logging_nan_inf_filter on (the default), replaces a NaN or "
        "inf loss by the mean of the window's earlier losses; a window of only NaN losses "
        "prints 0.0. The grad norm shows what the loss hides: the real loss is NaN, and with "
        "clipping a NaN norm makes every weight NaN in one optimizer step.",
        "masked labels (a batch whose labels are all -100 gives 0/0: run `finitetune check`), "
        "precision (fp16 overflow: try bf16 or fp32), a non-finite weight or input; rerun with "
        "logging_nan_inf_filter=False to see the raw loss, or train with finitetune's guard.",
        [c.steps[i] for i in hits])]


def _nan_loss(c: Context) -> list[dict[str, Any]]:
    have = [i for i, v in enumerate(c.loss) if v is not None]
    hits = [i for i in have if _bad(c.loss[i])]
    if not hits:
        return []
    return [_f(
        "nan_loss", "critical" if _persistent(hits, have) else "warning",
        f"Non-finite loss on {len(hits)} of {len(have)} entries "
        f"(first at step {_fmt(c.steps[hits[0]])})",
        "A NaN loss from the first step usually means a batch with no supervised token (all "
        "labels -100: mean over 0 tokens), a response marker the template did not find, or "
        "truncation that cut the response; later, an overflow or a diverging update.",
        "label validation (`finitetune check`), max_length vs response length, precision, LR.",
        [c.steps[i] for i in hits])]


def _nonfinite_grad(c: Context) -> list[dict[str, Any]]:
    have = [i for i, v in enumerate(c.grad) if v is not None]
    hits = [i for i in have if _bad(c.grad[i]) and _finite(c.loss[i]) and c.loss[i] != 0.0]
    if not hits:
        return []
    steps = [c.steps[i] for i in hits]
    n = f"{len(hits)} of {len(have)} entries"
    bad_all = [i for i in have if _bad(c.grad[i])]
    if _persistent(bad_all, have) and _persistent(hits, have):
        return [_f(
            "nonfinite_grad", "critical",
            f"Persistent non-finite grad norm with a finite loss ({n}, through the end)",
            "The forward pass is finite but the backward pass overflows: fp16's range ends at "
            "65504 (T5, Gemma, Qwen, MoE models are known to exceed it), or a bad kernel.",
            "precision (bf16 or fp32), the first non-finite parameter (finitetune's guard names "
            "it and replays the step in fp32 to tell precision from data).", steps)]
    early = min(max(2, math.ceil(0.1 * len(have))), len(have) // 2)  # the first 10 %
    if all(have.index(i) < early for i in hits):
        return [_f(
            "loss_scale_calibration", "info",
            f"Non-finite grad norm with a finite loss early on ({n}): fp16 loss-scale "
            "calibration",
            "GradScaler starts with a large scale and halves it on each overflow, skipping that "
            "step: a few skips at the start are normal.", "", steps)]
    return [_f(
        "fp16_skip_pattern", "warning",
        f"Intermittent non-finite grad norm with a finite loss ({n}): the fp16 loss-scale "
        "skip pattern",
        "With fp16 the GradScaler skips a step whose gradients overflow and lowers its scale; "
        "the logged norm is NaN/inf while the loss stays finite. Rare skips are harmless; "
        "skips that keep coming mean the gradients overflow fp16 itself.",
        "how often it recurs; bf16 instead of fp16 where the hardware has it.", steps)]


def _first_loss(c: Context) -> list[dict[str, Any]]:
    first = next(((s, v) for s, v in zip(c.steps, c.loss, strict=True)
                  if _finite(v) and v != 0.0), None)  # 0.0 may be a hidden NaN
    if first is None or first[1] <= c.loss_bound:
        return []
    assumed = " (vocabulary size assumed; pass --vocab-size)" if c.vocab_assumed else ""
    return [_f(
        "implausible_first_loss", "critical",
        f"First loss {first[1]:.4g} is implausible for a token-mean cross-entropy "
        f"(> ln(vocab) + margin = {c.loss_bound:.3g}{assumed})",
        "A mean over tokens starts near ln(vocab) for an untrained head and far below for a "
        "pretrained one. Losses in the thousands mean the loss is summed, not averaged, the "
        "labels are misaligned, the vocabulary is wrong, or a batch is corrupt.",
        "loss reduction (mean over supervised tokens), label shifting, tokenizer vs model "
        "vocabulary size, the first batch.", [first[0]])]


def _zero_lr(c: Context) -> list[dict[str, Any]]:
    have = [i for i, v in enumerate(c.lr) if _finite(v)]
    zeros = [i for i in have if c.lr[i] == 0.0]
    if not zeros:
        return []
    steps = [c.steps[i] for i in zeros]
    if len(zeros) == len(have):
        return [_f("zero_lr", "critical", "Learning rate is 0.0 on every logged entry",
                   "With a zero learning rate no update changes the weights.",
                   "learning_rate, the scheduler and its warm-up/decay steps.", steps)]
    # a linear warm-up starts at exactly 0 and a decaying schedule ends there: one entry each
    edges = {have[0], have[-1]}
    if set(zeros) <= edges:
        where = "first entry (start of a warm-up)" if zeros == have[:1] else (
            "last entry (end of a decaying schedule)" if zeros == have[-1:] else
            "first and last entries (warm-up start, schedule end)")
        return [_f("zero_lr", "info", f"Learning rate 0.0 on the {where}", steps=steps)]
    return [_f("zero_lr", "warning",
               f"Learning rate 0.0 during training ({len(zeros)} of {len(have)} entries, first "
               f"at step {_fmt(steps[0])})",
               "Steps at a zero learning rate change nothing: the schedule ended before "
               "training did, or it is misconfigured.",
               "max_steps vs the scheduler's total steps, warm-up length, resumed schedules.",
               steps)]


def _stuck(values: list[Opt], flags: list[bool]) -> tuple[int, int] | None:
    """The longest run of ``flags`` that is long enough, or the one that reaches the end."""
    have = sum(1 for v in values if v is not None)
    runs = [r for r in _runs(flags) if r[1] - r[0] + 1 >= min(STUCK_PATIENCE, have)]
    if not runs:
        return None
    return max(runs, key=lambda r: (r[1] == len(flags) - 1, r[1] - r[0]))


def _zero_loss(c: Context) -> list[dict[str, Any]]:
    flags = [v == 0.0 and (g is None or math.isfinite(g))
             for v, g in zip(c.loss, c.grad, strict=True)]
    run = _stuck(c.loss, flags)
    if run is None:
        return []
    a, b = run
    zero_grad = all(c.grad[i] == 0.0 for i in range(a, b + 1))
    also = " and grad norm exactly 0.0 (nothing is supervised)" if zero_grad else ""
    return [_f(
        "zero_loss", "critical" if b == len(flags) - 1 else "warning",
        f"Loss stuck at exactly 0.0 with finite grad norms on {b - a + 1} consecutive entries "
        f"(steps {_fmt(c.steps[a])}–{_fmt(c.steps[b])}){also}",
        "A real cross-entropy is never exactly 0. A batch whose labels are all -100 has a NaN "
        "loss and zero gradient, which the Trainer's NaN filter prints as 0.0; a collapsed "
        "model or a communication bug (DeepSpeed) gives the same picture.",
        "labels (`finitetune check`), the template's response marker, truncation.",
        [c.steps[a], c.steps[b]])]


def _zero_grad(c: Context) -> list[dict[str, Any]]:
    flags = [g == 0.0 and _finite(v) and v != 0.0 for v, g in zip(c.loss, c.grad, strict=True)]
    run = _stuck(c.grad, flags)
    if run is None:
        return []
    a, b = run
    return [_f(
        "zero_grad_norm", "critical" if b == len(flags) - 1 else "warning",
        f"Grad norm exactly 0.0 with a non-zero loss on {b - a + 1} consecutive entries",
        "No gradient reaches the trainable parameters.",
        "requires_grad of the parameters, LoRA target modules, a loss detached from the graph.",
        [c.steps[a], c.steps[b]])]


def _pinned_norm(c: Context) -> list[dict[str, Any]]:
    g = c.grad
    if c.clip:
        flags = [_finite(x) and abs(x - c.clip) <= 1e-6 * c.clip for x in g]
        what = f"at max_grad_norm = {c.clip:g}"
    else:
        same = [i > 0 and _finite(g[i]) and g[i] != 0.0 and g[i] == g[i - 1]
                for i in range(len(g))]
        flags = [same[i] or (i + 1 < len(g) and same[i + 1]) for i in range(len(g))]
        what = "at one constant value"
    runs = [r for r in _runs(flags) if r[1] - r[0] + 1 >= PIN_PATIENCE]
    if not runs:
        return []
    a, b = max(runs, key=lambda r: r[1] - r[0])
    return [_f(
        "pinned_grad_norm", "warning",
        f"Grad norm pinned {what} ({g[a]:.4g}) on {b - a + 1} consecutive entries",
        "A pre-clip norm does not sit on one value: the logged norm is post-clip (a logging or "
        "DeepSpeed communication bug) or the model has collapsed.",
        "which norm is logged, the loss of those steps, clipping settings.",
        [c.steps[a], c.steps[b]])]


def _spikes(c: Context) -> list[dict[str, Any]]:
    pts = [(s, x) for s, x in zip(c.steps, c.grad, strict=True) if _finite(x) and x > 0]
    if len(pts) < 10:
        return []
    logs = [math.log(x) for _, x in pts]
    med = statistics.median(logs)
    mad = statistics.median(abs(v - med) for v in logs) * 1.4826 or 1e-12
    # 2.3 = ln(10): a spike is also at least 10x the median norm
    hits = [s for (s, _), v in zip(pts, logs, strict=True)
            if (v - med) / mad > SPIKE_Z and v - med > 2.3]
    if not hits:
        return []
    return [_f("grad_norm_spikes", "info",
               f"{len(hits)} grad-norm spike(s), first at step {_fmt(hits[0])} "
               f"(>= 10x the median {math.exp(med):.4g})",
               "A spike followed by a rising loss is the start of a divergence; isolated "
               "spikes are usually single bad batches.",
               "the batches of those steps; finitetune's spike detector can skip them.", hits)]


def _trend(c: Context) -> list[dict[str, Any]]:
    t = c.trend
    if t.direction in ("unknown", "decreasing") or all(v == 0.0 for v in c.loss if _finite(v)):
        return []
    if t.direction == "flat" and t.evidence == "weak":
        return []
    evidence = f"{t.evidence} evidence, {t.n} points"
    return [_f("loss_not_decreasing", "warning",
               f"Loss is {t.direction}, not decreasing (Theil–Sen slope {t.slope:.3g}/step, "
               f"{evidence})",
               "A fine-tune whose loss does not fall over the run is not learning.",
               "learning rate (too low: flat; too high: rising), frozen parameters, labels.")]


def _guard(c: Context) -> list[dict[str, Any]]:
    def kind(event: dict[str, Any]) -> str:
        # finitetune's events: kind "guard", what it did under "action"
        return str(event.get("action") or event.get("kind") or "").lower()

    def steps(events: list[dict[str, Any]]) -> list[float]:
        return [e["step"] for e in events if isinstance(e.get("step"), (int, float))]

    out = []
    halts = [e for e in c.log.events if "halt" in kind(e)]
    if halts:
        last = halts[-1]
        out.append(_f("guard_halt", "critical",
                      f"The guard halted training at step {last.get('step', '?')}: "
                      f"{last.get('reason', 'no reason recorded')}",
                      "The run could not be kept finite; its events say which step and why.",
                      "the events timeline (`finitetune explain`).", steps(halts)))
    rollbacks = [e for e in c.log.events if "rollback" in kind(e)]
    if rollbacks:
        out.append(_f("guard_rollback", "warning",
                      f"The guard rolled back {len(rollbacks)} time(s)",
                      "A spike or a non-finite step was undone by restoring the last good state.",
                      "the events timeline (`finitetune explain`).", steps(rollbacks)))
    return out


def _eval(c: Context) -> list[dict[str, Any]]:
    ev = c.log.eval or {}
    before, after = ev.get("before"), ev.get("after")
    out = []
    if isinstance(before, dict) and isinstance(after, dict):
        for key, a in after.items():
            b = before.get(key)
            if is_accuracy(key) and _finite(a) and _finite(b) and a < b:
                out.append(_f("eval_dropped", "warning",
                              f"{key} fell from {b:.4g} before training to {a:.4g} after"))
            if key.endswith("loss") and _bad(a):
                out.append(_f("eval_nonfinite", "warning", f"{key} after training is {a}"))
    bad = [r["step"] for r in c.log.evals if _bad(r.get("eval_loss"))]
    if bad:
        out.append(_f("eval_nonfinite", "warning",
                      f"eval_loss is non-finite on {len(bad)} evaluation(s)", steps=bad))
    return out


def _labels(c: Context) -> list[dict[str, Any]]:
    labels = c.log.labels or {}
    total, usable = labels.get("total"), labels.get("usable")
    if not (isinstance(total, int) and isinstance(usable, int) and usable < total):
        return []
    why = labels.get("explanation")
    return [_f("labels_dropped", "info",
               f"{total - usable} of {total} training examples had nothing to learn and were "
               "left out (label validation)", why if isinstance(why, str) else "",
               "label_report.json names the examples and reasons.")]


def _empty(c: Context) -> list[dict[str, Any]]:
    if not c.steps:
        return [_f("no_steps", "warning", "No training step was logged")]
    return []


"""The five failure scenarios of ``finitetune verify``, each run unguarded and guarded.

A scenario passes only when the unguarded arm *reproduces* its failure (so the scenario is
proven real on this machine, with these versions) **and** the guarded arm is healthy. Each one
states its fault, how it is injected, and which checks decide "reproduced" and "fixed".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from finitetune.guard.policy import Action, Reason
from finitetune.settings.config import GuardConfig
from finitetune.testing import GradFault, OutputFault, assert_same_state
from finitetune.verify.harness import (
    BATCH,
    Check,
    Setup,
    decoder_layers,
    mlp_projection,
    run_arm,
)
from finitetune.verify.outcome import (
    FAULT_STEP,
    STEPS,
    ScenarioResult,
    common_fix_checks,
    guard_acted,
    num,
    steps_text,
)
from finitetune.verify.overflow import fp16_overflow

# --------------------------------------------------------------------------- model anatomy


# --------------------------------------------------------------------------- 1. labels


def all_masked(setup: Setup, root: Path) -> ScenarioResult:
    """Three consecutive batches whose every label is -100 (a template whose response marker
    was not found, a truncation that cut every response of a shard).

    Unguarded, the model's loss is 0/0 = NaN there with a gradient norm of exactly 0; the
    logging filter prints loss 0.0. Guarded, the safe loss counts those batches as empty (an
    exact 0 with 0 tokens, never NaN) and the guard skips them as ``no_valid_tokens``, so
    AdamW does not step on momentum alone. (``finitetune train`` would not even get there:
    label validation drops such rows first; here they are kept to show the runtime defence.)
    """
    from finitetune.data.labels import validate_labels

    bad = {6, 7, 8}
    rows = setup.take(STEPS * BATCH)
    for s in bad:
        for i in range((s - 1) * BATCH, s * BATCH):
            rows[i]["labels"] = [-100] * len(rows[i]["labels"])
    labels = validate_labels(rows, vocab_size=setup.vocab_size,
                             eos_token_id=setup.tokenizer.eos_token_id)
    u = run_arm(setup, root / "unguarded", "unguarded", rows, STEPS)
    g = run_arm(setup, root / "guarded", "guarded", rows, STEPS, guard=GuardConfig())
    loss_u = u.stat("loss")
    reproduce = [
        Check(f"model's loss non-finite at step(s) {steps_text(u.true_loss_nonfinite) or 'none'}",
              bad <= set(u.true_loss_nonfinite)),
        Check(f"logged as loss 0.0 on {loss_u.zero if loss_u else 0} entries; report: "
              + (", ".join(f.rule for f in u.findings()) or "healthy"),
              u.has_finding("zero_loss", "hidden_nan_loss", "nan_loss")),
    ]
    fix = [guard_acted(g, bad, (Action.SKIP,), (Reason.NO_VALID_TOKENS,)),
           Check(f"no NaN loss (non-finite at {steps_text(g.true_loss_nonfinite) or 'none'})",
                 not g.true_loss_nonfinite), *common_fix_checks(g)]
    empty = g.report.guard.get("empty_microbatches")
    rows_table = [("empty micro-batches counted", "-", f"{empty:g}" if empty is not None else "-")]
    notes = [f"label validation of these rows (what `finitetune check` and `finitetune train` "
             f"run first): {labels.counts.get('all_masked', 0)} of {labels.total} rows "
             "all_masked"]
    return ScenarioResult("all_masked", "all labels masked in some batches",
                          f"steps {steps_text(bad)}: every label of the batch is -100",
                          u, g, reproduce, fix, rows_table, notes)


# --------------------------------------------------------------------------- 2. hidden NaN


def hidden_nan(setup: Setup, root: Path) -> ScenarioResult:
    """One corrupt forward at step 7: NaN written into the first transformer block's output
    (as a bad batch, a flaky kernel or an overflow would leave it).

    Unguarded, the loss is NaN, clipping with the NaN norm turns every gradient into NaN, one
    AdamW step makes every weight NaN, and from then on every step logs loss 0.0 with
    grad_norm NaN: the seed's "before" picture, which the report diagnoses as a hidden NaN
    loss. Guarded, that step is skipped (parameters and optimizer state untouched) and
    training goes on.
    """
    def fault(model: Any) -> list[Any]:
        return [OutputFault(decoder_layers(model)[0], float("nan"), at={FAULT_STEP})]

    u = run_arm(setup, root / "unguarded", "unguarded", setup.take(STEPS * BATCH), STEPS,
                inject=fault)
    g = run_arm(setup, root / "guarded", "guarded", setup.take(STEPS * BATCH), STEPS,
                guard=GuardConfig(), inject=fault)
    hidden = [f for f in u.findings() if f.rule == "hidden_nan_loss"]
    reproduce = [
        Check("report: " + (hidden[0].title if hidden else "no hidden NaN loss found"),
              bool(hidden)),
        Check("final parameters NaN" if not u.params_finite else "final parameters finite",
              not u.params_finite),
    ]
    fix = [guard_acted(g, {FAULT_STEP}, (Action.SKIP,),
                       (Reason.NONFINITE_GRAD, Reason.NONFINITE_LOSS)),
           *common_fix_checks(g)]
    return ScenarioResult("hidden_nan", "a NaN loss hidden by the logging filter",
                          f"step {FAULT_STEP}: NaN in the first block's output (one forward)",
                          u, g, reproduce, fix)


# --------------------------------------------------------------------------- 3. inf grad


def inf_grad(setup: Setup, root: Path) -> ScenarioResult:
    """+inf written into one element of a feed-forward weight's gradient at step 7.

    Unguarded, the total norm is inf, clipping multiplies that gradient by 0 (inf x 0 = NaN),
    and the weights go NaN. Guarded, the step is skipped, and the final state is compared
    bit for bit (``torch.equal`` on every parameter, optimizer moment and step count, and the
    scheduler) with a control run that simply never saw that batch: the skip leaves no trace.
    """
    name, _module = mlp_projection(setup.model)
    param = f"{name}.weight"

    def fault(model: Any) -> list[Any]:
        return [GradFault(model, param, float("inf"), at={FAULT_STEP})]

    rows = setup.take(STEPS * BATCH)
    u = run_arm(setup, root / "unguarded", "unguarded", rows, STEPS, inject=fault)
    g = run_arm(setup, root / "guarded", "guarded", rows, STEPS, guard=GuardConfig(),
                inject=fault)
    skip = range((FAULT_STEP - 1) * BATCH, FAULT_STEP * BATCH)
    control_rows = [r for i, r in enumerate(rows) if i not in skip]
    c = run_arm(setup, root / "control", "control", control_rows, STEPS - 1, safe_loss=True)
    same, why = _same_state(g.trainer, c.trainer)
    grad_u = u.stat("grad_norm")
    reproduce = [
        Check(f"grad_norm non-finite on {grad_u.nan + grad_u.inf if grad_u else 0} logged "
              f"entries", bool(grad_u and grad_u.nan + grad_u.inf > 0)),
        Check("final parameters NaN" if not u.params_finite else "final parameters finite",
              not u.params_finite),
    ]
    fix = [guard_acted(g, {FAULT_STEP}, (Action.SKIP,), (Reason.NONFINITE_GRAD,)),
           Check("final state bit-identical to the control run without that batch"
                 + ("" if same else f" (NOT: {why})"), same),
           *common_fix_checks(g)]
    rows_table = [("equals control run (torch.equal)", "-", "yes" if same else "no")]
    return ScenarioResult("inf_grad", "inf injected into a gradient",
                          f"step {FAULT_STEP}: +inf in one element of {param}.grad",
                          u, g, reproduce, fix, rows_table,
                          [f"control run: the same Trainer and loss on the data without step "
                           f"{FAULT_STEP}'s batch, {STEPS - 1} steps ({c.directory})"])


def _same_state(a: Any, b: Any) -> tuple[bool, str]:
    try:
        assert_same_state(a.model, b.model, a.optimizer, b.optimizer, a.lr_scheduler,
                          b.lr_scheduler)
    except AssertionError as exc:
        return False, str(exc)
    return True, ""


# --------------------------------------------------------------------------- 5. LR


DIVERGENT_LR = 1.0
WARMUP = 10
LR_STEPS = 30


def divergence_guard(**overrides: Any) -> GuardConfig:
    """The guard settings of :func:`lr_divergence` (``rollback_to="disk"``: the on-disk policy)."""
    return GuardConfig(**{"policy": "rollback", "spike_action": "rollback", "spike_warmup": 4,
                          "lr_backoff": 0.03, **overrides})


def lr_divergence(setup: Setup, root: Path) -> ScenarioResult:
    """A peak learning rate of 1.0 (300x the healthy one), reached by a 10-step warm-up.

    The loss first falls while the LR is small, then explodes once it is large. Unguarded, it
    never recovers within the run. Guarded with ``policy="rollback", spike_action="rollback"``,
    the spike detector (warmed up on the first good steps) catches the jump, restores the last
    good state and multiplies the LR by ``lr_backoff=0.03`` (to 10x the healthy LR); the loss
    then falls well below where it started. (With a milder back-off, e.g. 0.1, the LR stays
    high enough for the loss to wander and the report rightly says it is not decreasing.)
    """
    cfg = divergence_guard()
    kw: dict[str, Any] = dict(lr=DIVERGENT_LR, schedule="constant_with_warmup",
                              warmup_steps=WARMUP)
    rows = setup.take(LR_STEPS * BATCH)
    u = run_arm(setup, root / "unguarded", "unguarded", rows, LR_STEPS, **kw)
    g = run_arm(setup, root / "guarded", "guarded", rows, LR_STEPS, guard=cfg, **kw)
    loss_u = u.stat("loss")
    exploded = bool(loss_u and loss_u.first and (
        loss_u.nan + loss_u.inf > 0 or (loss_u.max or 0) > 2 * loss_u.first))
    backoffs = [e for e in g.events if e.get("action") in (Action.ROLLBACK, Action.REDUCE_LR)]
    scale = g.report.guard.get("counters", {}).get("guard/lr_scale", 1.0)
    reproduce = [
        Check(f"loss exploded (max {num(loss_u.max if loss_u else None)} vs first "
              f"{num(loss_u.first if loss_u else None)})", exploded),
        Check("report: " + (", ".join(f.rule for f in u.findings()) or "healthy"),
              u.has_finding("loss_not_decreasing", "nan_loss", "hidden_nan_loss")),
    ]
    fix = [Check(f"guard backed off the LR {len(backoffs)} time(s) (LR x{scale:g}) at step(s) "
                 f"{steps_text([int(e['step']) for e in backoffs]) or 'none'}", bool(backoffs)),
           *common_fix_checks(g)]
    rows_table = [("LR scale at the end", "1", f"{scale:g}")]
    return ScenarioResult("lr_divergence", "a learning rate that diverges",
                          f"peak LR {DIVERGENT_LR:g} after {WARMUP} warm-up steps "
                          f"({LR_STEPS} steps)", u, g, reproduce, fix, rows_table)


SCENARIOS: dict[str, Callable[[Setup, Path], ScenarioResult]] = {
    "all_masked": all_masked,
    "hidden_nan": hidden_nan,
    "inf_grad": inf_grad,
    "fp16_overflow": fp16_overflow,
    "lr_divergence": lr_divergence,
}
"""Run order of ``finitetune verify``; ``--scenario KEY`` picks some."""

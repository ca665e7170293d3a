"""``finitetune verify``: prove on this machine that each failure is real and that the fix works.

The seed of this project was a five-step training run, reported before and after the fix: NaN
grad norms and zero losses gone, the loss falling. ``verify`` ships that proof:

1. a minimal guarded training of ``steps`` steps, reported the way the seed did (entries,
   valid, NaN, zero, range, mean, trend);
2. five failure scenarios (:mod:`finitetune.verify.scenarios`), each run twice on a real
   ``transformers.Trainer``: unguarded (plain transformers defaults) and guarded (finitetune's
   safe loss, gradient guard and precision policy). A scenario counts only when the unguarded
   run reproduces the failure *and* the guarded run is healthy; a verify that could not fail
   would prove nothing.

The default model is the embedded tiny Llama (2 layers, under a million parameters) and its
generated task: eleven short trainings take seconds on two CPU cores, where SmolLM2-135M would take many minutes.
The failures are numerical, not a matter of model size: the same Trainer code paths run.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from finitetune.errors import ConfigError
from finitetune.parsing.terminal import printable
from finitetune.rundir.jsonio import write_json_atomic

__all__ = ["VerifyResult", "run_verify"]


@dataclass
class VerifyResult:
    ok: bool
    minimal_ok: bool
    scenarios: list[Any]
    minimal: Any
    seconds: float
    output_dir: Path | None
    data: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def run_verify(
    model: str = "tiny", steps: int = 5, output_dir: str | None = None,
    data: str | None = None, scenarios: list[str] | None = None,
    out: TextIO | None = None, as_json: bool = False,
) -> VerifyResult:
    """Run the minimal guarded training and the scenarios; print the tables to ``out``.

    ``output_dir`` keeps each arm's files in ``DIR/<scenario>/<arm>/`` (plus ``DIR/minimal``
    and ``DIR/verify.json``); without it a temporary directory is used and removed.
    """
    from finitetune.verify import render
    from finitetune.verify.scenarios import SCENARIOS

    stream = out if out is not None else sys.stdout
    if steps < 5:
        raise ConfigError(f"--steps {steps}: expected at least 5 (the report calls a run "
                          "healthy only on a loss trend it can test, which takes 5 logged steps)")
    chosen = scenarios or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise ConfigError(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    root = _prepare_root(output_dir)

    def say(text: str = "") -> None:
        if not as_json:
            print(printable(text), file=stream, flush=True)  # paths and names the user gave

    start = time.perf_counter()
    held = contextlib.ExitStack()  # the output directory's RunLock, once it is made
    try:
        results, minimal, minimal_ok = _run_scenarios(model, data, steps, chosen, root,
                                                      output_dir is not None, say, held)
        seconds = time.perf_counter() - start
        info = {"model": model, "data": data, "steps": steps, "seconds": round(seconds, 1),
                "output_dir": str(root) if output_dir else None}
        payload = render.to_dict(results, minimal, minimal_ok, info, root)
        write_json_atomic(root / "verify.json", payload)
        say()
        say(render.summary_line(results, minimal_ok, seconds))
        if as_json:
            from finitetune.rundir.jsonio import dumps_strict

            print(dumps_strict(payload, indent=2), file=stream, flush=True)
        for res in results:  # drop the Trainers (and their models) now, not at interpreter exit
            for arm in (res.unguarded, res.guarded):
                arm.trainer = None
        minimal.trainer = None
        return VerifyResult(ok=payload["ok"], minimal_ok=minimal_ok, scenarios=results,
                            minimal=minimal, seconds=seconds,
                            output_dir=root if output_dir else None, data=payload)
    finally:
        held.close()
        if not output_dir:
            shutil.rmtree(root, ignore_errors=True)


_CREATOR = "finitetune verify"
"""Only a directory verify created itself (its owner marker) is replaced."""


def _prepare_root(output_dir: str | None) -> Path:
    """The output directory: a fresh temporary one, or ``output_dir``, checked now (new, empty
    or an earlier verify output, never a user's files) and made by :func:`_run_scenarios` only
    once the model and data have loaded, so a bad input writes nothing."""
    if not output_dir:
        return Path(tempfile.mkdtemp(prefix="finitetune-verify-"))
    from finitetune.rundir.paths import check_output_dir

    check_output_dir(output_dir, "--output-dir", created_by=_CREATOR, replace=True)
    return Path(output_dir)


def _run_scenarios(model: str, data: str | None, steps: int, chosen: list[str], root: Path,
                   kept: bool, say: Callable[..., None], held: contextlib.ExitStack,
                   ) -> tuple[list[Any], Any, bool]:
    """The minimal guarded run, then each chosen scenario; prints as it goes. A kept output
    directory is made here, once the model and data loaded, and its lock entered into
    ``held`` (the caller releases it after writing ``verify.json``)."""
    from finitetune.settings.config import GuardConfig
    from finitetune.verify import render
    from finitetune.verify.harness import BATCH, LR, prepare_setup, quiet, run_arm
    from finitetune.verify.scenarios import LR_STEPS, SCENARIOS, STEPS

    # the rows every arm needs: the longest scenario, or the minimal run if longer
    need = max(STEPS, LR_STEPS, steps) * BATCH
    with quiet():
        setup = prepare_setup(model, data=data, rows_needed=need)
    if kept:  # locked while this verify writes it: a second one does not delete it meanwhile
        from finitetune.rundir.paths import RunLock, prepare_output_dir

        prepare_output_dir(root, "--output-dir", _CREATOR, replace=True)
        held.enter_context(RunLock(root, _CREATOR))
    with quiet(setup.threads):
        say(f"finitetune verify: {model} ({setup.n_params / 1e6:.1f}M params, vocab "
            f"{setup.vocab_size}) on {setup.task}; batch {BATCH}, CPU, "
            f"{setup.threads} torch thread(s)")
        say(f"files: {root}" + ("" if kept else " (temporary)"))
        say()
        minimal = run_arm(setup, root / "minimal", "guarded", setup.take(steps * BATCH),
                          steps, guard=GuardConfig(), lr=LR)
        minimal_ok = (minimal.report.verdict == "healthy" and minimal.params_finite
                      and minimal.loss_fell())
        say(render.seed_report(minimal, steps))
        results = []
        for i, key in enumerate(chosen, 1):
            res = SCENARIOS[key](setup, root / key)
            results.append(res)
            say()
            say(render.scenario_table(i, res))
    return results, minimal, minimal_ok

"""The gradient guard under DeepSpeed ZeRO-1, 2 and 3: the decision inside DeepSpeed's own step.

Under DeepSpeed the Trainer's backward (accelerate's ``DeepSpeedEngineWrapper.backward``) calls
``engine.step()``, which calls the ZeRO optimizer's ``step``: that is where DeepSpeed computes
the global norm, decides on overflow, clips and updates, all *before* any Trainer hook runs; the
Trainer's own ``optimizer.step()`` is then a no-op. So the guard sits there too: a
:class:`ZeroSession` (the Trainer integration's
:class:`~finitetune.integrations.hf.session.GuardSession`, moved into DeepSpeed's step)
wraps, for the run, and undoes however it ends:

- ``zero_optimizer.step`` (instance-level wrapper): before DeepSpeed touches anything, the guard
  reads this rank's gradient *partition* (``averaged_gradients``: the reduced gradients ZeRO
  keeps per rank), adds the squared norms and finite flags up across ranks in its one
  all-reduce, and decides. Applied: DeepSpeed's step runs as usual (it clips with its own
  ``gradient_clipping``). Not applied: DeepSpeed's step runs with its overflow check forced to
  "overflow", so its *own* skip path runs: gradients cleared, parameters, master weights and
  optimizer state untouched, ``engine.skipped_steps`` counted, the loss scale updated, and its
  ``overflow`` flag tells accelerate and the Trainer not to advance the LR scheduler. The
  Trainer then logs the guard's pre-clip norm (NaN for a NaN step), not DeepSpeed's ``inf``.
- the forced overflow: ZeRO-1/2's ``check_overflow`` (also when ``bf16.check_grad_overflow``
  is off, which is the case where DeepSpeed alone would apply a NaN step), ZeRO-3's
  ``_overflow_check_and_loss_scale_update``;
- ``engine.backward``: feeds the micro-batch loss to the guard before the step it belongs to
  (the supervised tokens come from the session's ``training_step``, as without DeepSpeed).

The guard itself, over this rank's gradient partition, is
:class:`~finitetune.integrations.deepspeed.zero_guard.ZeroGuard`.

Every private name used is listed in :data:`SEAMS` and checked at start-up (:func:`check`);
a DeepSpeed release that renames one stops with a ``ConfigError`` naming the tested version,
instead of a guard that silently does nothing.

What cannot work, and says so at start-up: ZeRO stage 0 and DeepSpeed's ``BF16_Optimizer`` (no
ZeRO partition to read), optimizer offload (the partitions live in CPU buffers the guard does
not read), rollback under ZeRO-3 (parameters are partitioned; no snapshot is restorable),
``GuardConfig.max_grad_norm`` different from DeepSpeed's ``gradient_clipping`` (DeepSpeed clips).
Cross-rank checks: parameters are replicated under ZeRO-1/2 (checksummed every
``rank_check_every`` steps); gradients are partitioned (not compared); ZeRO-3 shares nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from finitetune import distributed
from finitetune.errors import ConfigError
from finitetune.guard.policy import Action
from finitetune.integrations.deepspeed.zero_guard import ZeroGuard
from finitetune.integrations.hf.seams import missing_decision_error
from finitetune.integrations.hf.session import GuardSession
from finitetune.settings.config import GuardConfig

__all__ = ["SEAMS", "TESTED", "ZeroGuard", "ZeroSession", "check", "load_config", "make_guard"]

logger = logging.getLogger("finitetune.guard")

TESTED = "deepspeed 0.19.8"
"""The DeepSpeed release the seams below are tested with (``tests/test_deepspeed.py``)."""

SEAMS: dict[str, tuple[str, ...]] = {
    "DeepSpeedZeroOptimizer": ("step", "averaged_gradients", "check_overflow",
                               "check_grad_overflow", "overflow", "_global_grad_norm",
                               "loss_scale", "update_lp_params", "params_in_partition",
                               "cpu_offload", "dp_process_group", "dynamic_loss_scale"),
    "DeepSpeedZeroOptimizer_Stage3": ("step", "averaged_gradients",
                                      "_overflow_check_and_loss_scale_update", "overflow",
                                      "fp32_partitioned_groups_flat",
                                      "_global_grad_norm", "loss_scale", "fp16_groups",
                                      "offload_optimizer", "dp_process_group"),
    "DeepSpeedEngine": ("backward", "optimizer", "zero_optimization_stage",
                        "gradient_clipping", "skipped_steps", "param_names"),
}
"""Attributes of DeepSpeed objects the guard reads or wraps, per class (checked at start-up)."""


def load_config(path: str, *, cuda: bool) -> dict[str, Any]:
    """Read and check a DeepSpeed JSON config for ``finitetune train --deepspeed`` (before
    anything is written). Without CUDA it also selects DeepSpeed's CPU accelerator
    (``DS_ACCELERATOR=cpu``), which it would otherwise not pick for a gloo run.

    Raises:
        ConfigError: the file is missing or not JSON (with the line), or its ZeRO stage is not
            1, 2 or 3.
    """
    import json
    import os
    from pathlib import Path

    from finitetune.errors import NestingError
    from finitetune.parsing.nesting import json_loads

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--deepspeed {path}: no such file (a DeepSpeed JSON config)")
    try:
        config = json_loads(file.read_text(encoding="utf-8"), f"--deepspeed {path}")
    except NestingError as exc:
        raise ConfigError(str(exc)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f", line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigError(f"--deepspeed {path}{where}: not a JSON file ({exc})") from None
    stage = (config.get("zero_optimization") or {}).get("stage", 0) if isinstance(
        config, dict) else None
    if stage not in (1, 2, 3):
        raise ConfigError(f"--deepspeed {path}: zero_optimization.stage is {stage!r}; the "
                          "gradient guard runs under ZeRO stage 1, 2 or 3")
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return config


def engine_of(trainer: Any) -> Any:
    """The Trainer's ``DeepSpeedEngine`` (set once ``train()`` has prepared the model)."""
    engine = getattr(trainer, "deepspeed", None) or getattr(trainer, "model_wrapped", None)
    if type(engine).__name__ != "DeepSpeedEngine":
        raise ConfigError("GuardCallback under DeepSpeed found no DeepSpeedEngine on the Trainer "
                          f"(got {type(engine).__name__}); it is tested with {TESTED}.")
    return engine


def check(engine: Any, config: GuardConfig) -> int:
    """Refuse, at start-up, what the guard cannot make safe under DeepSpeed; return the stage.

    Raises:
        ConfigError: with what to change (see the module docstring for the list).
    """
    stage = int(engine.zero_optimization_stage())
    zo = engine.optimizer
    kind = type(zo).__name__
    if stage not in (1, 2, 3) or kind not in SEAMS:
        raise ConfigError(
            f"the gradient guard supports DeepSpeed ZeRO stage 1, 2 or 3 (got stage {stage}, "
            f"optimizer {kind}): set zero_optimization.stage to 1-3 in the DeepSpeed config "
            "(bf16 with ZeRO-1 also needs data_types.grad_accum_dtype unset or bf16, else "
            "DeepSpeed uses its BF16_Optimizer, which the guard does not read).")
    for obj, cls in ((engine, "DeepSpeedEngine"), (zo, kind)):
        missing = [name for name in SEAMS[cls] if not hasattr(obj, name)]
        if missing:
            raise ConfigError(
                f"this DeepSpeed release has no {cls}.{', '.join(missing)}, which the gradient "
                f"guard relies on (tested with {TESTED}): install deepspeed==0.19.8 or train "
                "without DeepSpeed (DDP or FSDP2).")
    if getattr(zo, "cpu_offload", False) or getattr(zo, "offload_optimizer", False):
        raise ConfigError("the gradient guard does not read DeepSpeed's offloaded optimizer "
                          "partitions: remove zero_optimization.offload_optimizer.")
    if distributed.is_distributed() and torch.distributed.get_world_size(
            zo.dp_process_group) != distributed.world_size():
        raise ConfigError("the gradient guard supports DeepSpeed with pure data parallelism "
                          "(the ZeRO group is every rank); model/sequence parallel groups "
                          "are not supported.")
    if stage == 3 and config.needs_snapshots:
        raise ConfigError("rollback needs a restorable snapshot of the parameters, which ZeRO-3 "
                          "partitions across ranks: use policy/spike_action skip, reduce_lr or "
                          "halt with ZeRO-3, or ZeRO-1/2 for rollback.")
    if config.clip != "fixed":
        raise ConfigError("adaptive clipping needs the guard to clip, but under DeepSpeed the "
                          "gradients are clipped inside DeepSpeed's step with its fixed "
                          "gradient_clipping: use clip='fixed' with DeepSpeed.")
    clip = float(engine.gradient_clipping() or 0.0)
    if config.max_grad_norm is not None and float(config.max_grad_norm) != clip:
        raise ConfigError(
            f"under DeepSpeed the gradients are clipped by DeepSpeed's gradient_clipping "
            f"({clip:g}), not by the guard: leave GuardConfig.max_grad_norm unset (it is "
            f"{config.max_grad_norm:g}) or set the same value in the DeepSpeed config.")
    return stage


def make_guard(trainer: Any, config: GuardConfig, *, output_dir: Any, on_fault: Any,
               start_step: int = 0) -> ZeroGuard:
    """The guard for a Trainer running under DeepSpeed (after :func:`check`)."""
    engine = engine_of(trainer)
    check(engine, config)
    return ZeroGuard(engine, trainer.model, config, trainer.lr_scheduler,
                     output_dir=output_dir, on_fault=on_fault, start_step=start_step)


class ZeroSession(GuardSession):
    """The :class:`~finitetune.integrations.hf.session.GuardSession` of a Trainer under
    DeepSpeed: the decision moves into the ZeRO optimizer's ``step`` (module docstring).

    Its extra seams (``engine.backward``, the ZeRO optimizer's ``step``) are wrapped and undone
    like the session's own. The Trainer still asks for the norm (its Accelerator's ``clip_grad_norm_``) and steps
    accelerate's no-op optimizer wrapper afterwards: both find the decision already taken; the
    LR scheduler is held by DeepSpeed's overflow flag, not by the session.
    """

    def __init__(self, trainer: Any, guard: ZeroGuard, *, shifts_labels: bool) -> None:
        super().__init__(trainer, guard, shifts_labels=shifts_labels)
        self.zero_guard = guard
        self._tokens: torch.Tensor | None = None
        backward, step = guard.engine.backward, guard.zero.step

        def guarded_backward(loss: Any, *args: Any, **kwargs: Any) -> Any:
            # before the backward whose engine.step() decides: this micro-batch belongs to it
            if isinstance(loss, torch.Tensor):
                guard.observe_loss(loss.detach(), self._tokens, window_normalized=True)
            self._tokens = None
            return backward(loss, *args, **kwargs)

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            return self._zero_step(step, *args, **kwargs)

        self._wrap(guard.engine, "backward", guarded_backward)
        self._wrap(guard.zero, "step", guarded_step)

    def before_micro_batch(self, inputs: Any) -> tuple[Any, torch.Tensor | None]:
        inputs, tokens = super().before_micro_batch(inputs)
        self._tokens = tokens  # for engine.backward, which feeds the loss to the guard
        return inputs, tokens

    def after_micro_batch(self, loss: Any, tokens: torch.Tensor | None) -> None:
        """Nothing: the loss reached the guard in ``engine.backward``, before its step."""

    def decide(self) -> float:
        """The Trainer asks for the norm after DeepSpeed's step: the decision is taken."""
        if self.pending is None:
            raise ConfigError(f"DeepSpeed updated the model without the gradient guard's "
                              f"decision (its ZeRO optimizer step was not reached; tested with "
                              f"{TESTED}): install deepspeed==0.19.8 or train without the guard.")
        return self.pending.grad_norm

    def _zero_step(self, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The ZeRO optimizer's step, decided by the guard first (every rank, same decision)."""
        guard, zo = self.zero_guard, self.zero_guard.zero
        GuardSession.decide(self)  # COLLECTIVE + HOST SYNC: the guard's one all-reduce and read
        outcome = self.pending
        assert outcome is not None  # set by decide
        if outcome.action == Action.ROLLBACK:
            # the guard restored the fp32 master partitions; the model's weights follow them
            zo.update_lp_params()  # COLLECTIVE (all-gather), on every rank alike
        if outcome.applied:
            return step(*args, **kwargs)
        with self._forced_overflow():
            result = step(*args, **kwargs)  # DeepSpeed's own skip path
        zo._global_grad_norm = outcome.grad_norm  # the Trainer logs the true pre-clip norm
        if guard.config.scheduler_on_skip and guard.scheduler is not None:
            guard.scheduler.step()  # the Trainer holds it (overflow flag): advance it here
        return result

    def _guarded_optimizer_step(self, optimizer: Any) -> Any:
        step = optimizer.step

        @functools.wraps(step)
        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            outcome, self.pending = self.pending, None
            if outcome is None:  # DeepSpeed's step did not reach the guard: never unnoticed
                raise missing_decision_error(self.guard.max_grad_norm)
            return step(*args, **kwargs)  # accelerate's no-op: DeepSpeed stepped or skipped

        return guarded_step

    @contextlib.contextmanager
    def _forced_overflow(self) -> Iterator[None]:
        """Make DeepSpeed's overflow check report an overflow for one step (no collective)."""
        zo = self.zero_guard.zero

        def overflow(*args: Any, **kwargs: Any) -> bool:
            zo.overflow = True
            return True

        if self.zero_guard.stage == 3:
            name, saved = "_overflow_check_and_loss_scale_update", []
        else:  # also when bf16.check_grad_overflow is off: the check is then not even called
            name, saved = "check_overflow", [("check_grad_overflow", zo.check_grad_overflow)]
            zo.check_grad_overflow = True
        setattr(zo, name, overflow)
        try:
            yield
        finally:
            del zo.__dict__[name]
            for attr, value in saved:
                setattr(zo, attr, value)
            if not zo.overflow:  # the seam did nothing: never leave that unnoticed
                raise RuntimeError(f"DeepSpeed's step did not take its overflow path (tested "
                                   f"with {TESTED}); the step may have been applied")

"""``CheckpointCallback``: no poisoned checkpoint, resume from the newest healthy one, and the
on-disk rollback, for ``transformers.Trainer``::

    trainer = Trainer(..., callbacks=[GuardCallback(cfg), CheckpointCallback()])
    trainer.train(resume_from_checkpoint=True)     # the newest *healthy* checkpoint

What it changes, on the Trainer *instance* it is given (bound by the construction hook of
:mod:`~finitetune.integrations.hf.mixin`, like ``GuardCallback``):

- **Saves** (``_save_checkpoint``, whatever triggered it: ``save_steps``, epoch end, best
  metric, end of training): first the trainable parameters and optimizer state are checked
  finite in one fused pass (:func:`~finitetune.guard.state_check.check_state`). A poisoned
  state is not written: the save is refused with an event (``save_refused``) and a warning,
  so ``save_total_limit`` rotation (which runs inside the save) never deletes the last healthy
  checkpoint for it. A state that passes is saved and marked with
  :data:`~finitetune.rundir.files.CHECKPOINT_MARKER`; the newest checkpoint whose state then
  gave a clean step is *pinned*: rotation keeps it (through the Trainer's own protection,
  ``best_model_checkpoint``, set only while the save's rotation runs and only when no
  ``metric_for_best_model`` uses that field: :func:`_kept_by_rotation`).
- **Resume** (``train(resume_from_checkpoint=True)``): the newest healthy checkpoint, not
  the newest folder (:func:`finitetune.rundir.resume.prepare_resume`: unusable ones set aside and
  named, logs trimmed); an explicit path is checked and refused with the reason if unusable.
- **On-disk rollback** (``GuardConfig(rollback_to="disk")``): the guard rolls back to the
  newest healthy checkpoint (:class:`~finitetune.guard.disk_rollback.DiskRollback`).
- **Bad samples**: the after-windows of remembered faults are written at saves and at the end
  (:class:`~finitetune.guard.bad_batches.BadSampleMemory`).

Private Trainer methods used, listed in :data:`~finitetune.integrations.hf.seams.SEAMS` and
checked when the callback binds (a seam that silently does nothing would let a poisoned save through):
``Trainer._save_checkpoint(model, trial)`` (the one place every save goes through) and
``Trainer._load_from_checkpoint(path)`` (weights of adapter / sharded checkpoints).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finitetune import distributed
from finitetune.errors import ConfigError, ResumeError
from finitetune.guard.bad_batches import BadSampleMemory
from finitetune.guard.disk_rollback import DiskRollback, load_safetensors_weights
from finitetune.guard.policy import Reason
from finitetune.guard.state_check import check_state
from finitetune.integrations.hf.mixin import install_construction_hook
from finitetune.integrations.hf.seams import check_environment
from finitetune.rundir import files as run_files
from finitetune.rundir.checkpoints import CheckpointHealth, Health, inspect_checkpoint, write_marker
from finitetune.rundir.resume import prepare_resume, record_event
from finitetune.settings.config import GuardConfig

__all__ = ["CheckpointCallback", "load_checkpoint_weights"]

log = logging.getLogger("finitetune")

install_construction_hook()  # a Trainer given this callback binds it (set_trainer)


_WARNINGS_ONLY = (None, Reason.ZERO_LOSS, Reason.PINNED_GRAD_NORM)
"""An applied step with one of these (no reason, or only a warning) proves the state it began
from."""


@contextlib.contextmanager
def _kept_by_rotation(state: Any, keep: Path | None) -> Iterator[None]:
    """Inside one Trainer save: rotation (``save_total_limit``) keeps ``keep``.

    The Trainer's rotation keeps the newest checkpoint and ``state.best_model_checkpoint``;
    every release writes the checkpoint's ``trainer_state.json`` and then rotates. So the field
    is set right after that file is written (a per-instance wrapper of ``save_to_json``) and
    restored when the save returns: the saved files and the state callbacks see afterwards
    are exactly a plain Trainer's (``best_model_checkpoint`` stays None without a metric).
    """
    if keep is None:
        yield
        return
    before = state.best_model_checkpoint
    write = state.save_to_json

    def write_then_keep(path: str) -> None:
        write(path)
        state.best_model_checkpoint = str(keep)

    state.save_to_json = write_then_keep
    try:
        yield
    finally:
        del state.save_to_json
        state.best_model_checkpoint = before


def load_checkpoint_weights(trainer: Any, path: str | Path) -> None:
    """Load a checkpoint's weights into ``trainer.model`` (tensor by tensor when it is a plain
    safetensors state dict, else the Trainer's own loader: adapters, sharded formats)."""
    if not load_safetensors_weights(trainer.model, Path(path)):
        trainer._load_from_checkpoint(str(path))


class CheckpointCallback(TrainerCallback):
    """Healthy checkpoints only; resume from the newest healthy one; on-disk rollback.

    Args:
        output_dir: the run directory for events (default ``args.output_dir``).
        config: the guard's settings (``rollback_to``); default ``GuardConfig()``.
        memory: the run's bad-sample memory (its after-windows are flushed at saves).
    """

    def __init__(self, output_dir: str | os.PathLike | None = None, *,
                 config: GuardConfig | None = None,
                 memory: BadSampleMemory | None = None) -> None:
        self.output_dir = output_dir
        self.config = config if config is not None else GuardConfig()
        self.memory = memory
        self.trainer: Any = None  # a Trainer (its private methods are used: see SEAMS)
        self._candidate: CheckpointHealth | None = None
        self._pinned: CheckpointHealth | None = None
        self.refused: list[int] = []
        """Steps whose save was refused."""
        self.disk: DiskRollback | None = None

    # ---- binding ----------------------------------------------------------------------------
    def set_trainer(self, trainer: Any) -> CheckpointCallback:
        """Wrap ``trainer``'s ``train`` (resume) and ``_save_checkpoint`` (done for you when the
        Trainer is built with this callback or it is added with ``add_callback``)."""
        if self.trainer is trainer:
            return self
        # the seams it wraps: a save wrapper that never ran would let a poisoned state reach disk
        check_environment()
        self.trainer = trainer
        train, save = trainer.train, trainer._save_checkpoint

        def resuming_train(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
            return train(self._resolve(resume_from_checkpoint), *args, **kwargs)

        def checked_save(model: Any, trial: Any, *args: Any, **kwargs: Any) -> Any:
            return self._save(save, model, trial, *args, **kwargs)

        trainer.train = resuming_train
        trainer._save_checkpoint = checked_save
        return self

    def _out(self) -> Path:
        return Path(self.output_dir or self.trainer.args.output_dir)

    # ---- resume -----------------------------------------------------------------------------
    def _resolve(self, resume: Any) -> Any:
        """``True`` -> the newest healthy checkpoint; a path -> checked; else unchanged."""
        if resume is None or resume is False:
            return resume
        out = Path(self.trainer.args.output_dir)
        if isinstance(resume, bool):  # rank 0 chooses and renames; the others wait for it
            plan = (prepare_resume(out, trim=(self._out() / run_files.METRICS).is_file(),
                                   require=True) if distributed.is_main_process() else None)
            path = distributed.broadcast_object(plan.path if plan else None)  # COLLECTIVE
            if path is None:
                why = ("; ".join(h.describe() for h in plan.rejected) if plan else "") or (
                    "no usable checkpoint-* folder")
                raise ResumeError(f"No valid checkpoint found in output directory ({out}): "
                                  f"finitetune found no healthy checkpoint ({why})")
            return path
        health = inspect_checkpoint(resume)
        if not health.ok:
            raise ResumeError(f"Can't find a valid checkpoint at {resume}: finitetune judged "
                              f"it {health.health.value} ({health.reason}). Pass "
                              "resume_from_checkpoint=True to use the newest healthy one.")
        return resume

    # ---- saving -----------------------------------------------------------------------------
    def _save(self, save: Any, model: Any, trial: Any, *args: Any, **kwargs: Any) -> Any:
        trainer = self.trainer
        step = trainer.state.global_step
        if self.memory is not None:
            self.memory.flush()  # COLLECTIVE when distributed: every rank saves
        check = check_state(trainer.model, trainer.optimizer)  # HOST SYNC (save time only)
        if not check.finite:
            self._refuse(step, check.nonfinite)
            return None
        run_dir = Path(trainer._get_output_dir(trial=trial)) if hasattr(
            trainer, "_get_output_dir") else Path(trainer.args.output_dir)
        target = run_dir / f"{run_files.CHECKPOINT_PREFIX}{step}"
        final = step >= trainer.state.max_steps > 0
        keep = None
        if trainer.args.metric_for_best_model is None:
            # the last proven checkpoint (the one a rollback goes back to), or at the end the
            # final one, is kept against rotation
            keep = target if final or self._pinned is None else self._pinned.path
        with _kept_by_rotation(trainer.state, keep):
            result = save(model, trial, *args, **kwargs)
        guard = self._guard()
        marker = {"lr_scale": float(getattr(guard, "lr_scale", 1.0)),
                  "tensors_checked": check.tensors,
                  "guard": {k: (guard.counters.get(k) if guard is not None else None)
                            for k in ("applied", "skipped", "rollbacks")}}
        if trainer.args.should_save:
            write_marker(target, step, **marker)
        self._candidate = CheckpointHealth(target, step, Health.HEALTHY, "saved now",
                                           {"step": step, **marker})
        return result

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The state in the newest checkpoint proved itself when the next step was clean (a
        finite, non-spiking loss and gradient): it becomes the pinned rollback target."""
        cand = self._candidate
        if cand is None or state.global_step <= cand.step:
            return
        self._candidate = None
        guard = self._guard()
        outcome = getattr(guard, "last_outcome", None)
        if state.global_step != cand.step + 1 or (outcome is not None and not (
                outcome.applied and outcome.reason in _WARNINGS_ONLY)):
            return  # that state produced a bad step (or we cannot tell): not a rollback target
        cand.marker = {**(cand.marker or {}), "proven_by_step": state.global_step}
        if args.should_save and cand.path.is_dir():
            write_marker(cand.path, cand.step, **{k: v for k, v in cand.marker.items()
                                                  if k not in ("step", "files", "finite")})
        self._pinned = cand
        if self.disk is not None:
            self.disk.use(cand)

    @property
    def pinned(self) -> str | None:
        """The last checkpoint saved finite whose state then gave a clean step."""
        return self._pinned.name if self._pinned is not None else None

    def _refuse(self, step: int, nonfinite: list[str]) -> None:
        self.refused.append(step)
        if not distributed.is_main_process():
            return
        pinned = self.pinned or (self._candidate.name if self._candidate else None) or (
            self._newest_on_disk())
        names = ", ".join(nonfinite[:3]) + (f" (+{len(nonfinite) - 3} more)"
                                             if len(nonfinite) > 3 else "")
        keep = (f"{pinned} stays the last healthy checkpoint (pinned: rotation keeps it)"
                if pinned else "no healthy checkpoint exists yet")
        record_event(self._out(), {
            "step": step, "kind": "checkpoint", "action": "save_refused",
            "reason": "nonfinite_state", "nonfinite": nonfinite[:20],
            "nonfinite_count": len(nonfinite), "pinned": pinned,
            "message": f"step {step}: checkpoint NOT saved: NaN/inf in {names}; {keep}"})

    def _newest_on_disk(self) -> str | None:
        found = run_files.checkpoints(self.trainer.args.output_dir)
        return found[-1].name if found else None

    # ---- on-disk rollback -------------------------------------------------------------------
    def _guard(self) -> Any:
        from finitetune.guard.guard import Guard

        for cb in self.trainer.callback_handler.callbacks:
            if isinstance(getattr(cb, "guard", None), Guard):
                return cb.guard
        return None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            raise ConfigError("CheckpointCallback is not bound to a Trainer: pass it in "
                              "Trainer(callbacks=[...]) or trainer.add_callback(...), or call "
                              "callback.set_trainer(trainer) before train()")
        self.disk = None
        if self.config.needs_snapshots and self.config.rollback_to == "disk":
            if args.save_strategy in ("no", None):
                raise ConfigError("guard rollback_to='disk' rolls back to the run's checkpoints,"
                                  " but saving is off (save_strategy='no'): set save_steps")
            if args.save_strategy == "steps" and args.save_steps >= state.max_steps > 0:
                log.warning("finitetune: rollback_to='disk' but the first checkpoint comes at "
                            "the end (save_steps=%s): until then a rollback is a skip; set "
                            "save_steps lower", args.save_steps)
            self._attach_disk()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.config.needs_snapshots and self.config.rollback_to == "disk" and (
                self.disk is None):
            self._attach_disk()  # the GuardCallback was listed after this one

    def _attach_disk(self) -> None:
        guard = self._guard()
        if guard is None:
            return
        trainer = self.trainer
        self.disk = DiskRollback(
            trainer.model, trainer.optimizer, trainer.lr_scheduler, self._out(),
            load_weights=lambda path: trainer._load_from_checkpoint(str(path)),
            on_restore=self._restored)
        self.disk.attach(guard)

    def _restored(self, info: dict[str, Any]) -> None:
        if not distributed.is_main_process():
            return
        guard = self._guard()
        step = guard.counters["steps"] if guard is not None else self.trainer.state.global_step
        record_event(self._out(), {
            "step": step, "kind": "checkpoint", "action": "restored", **info,
            "message": f"step {step}: rolled back to {info['checkpoint']} on disk (weights, "
                       f"optimizer, scheduler) in {info['seconds']} s; the batches of steps "
                       f"{info['checkpoint_step'] + 1}-{step} are skipped"})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.memory is not None:
            self.memory.flush()  # COLLECTIVE when distributed: every rank ends training

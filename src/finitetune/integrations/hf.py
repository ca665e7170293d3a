"""``GuardCallback``: the gradient guard for ``transformers.Trainer`` and TRL's trainers, one line.

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[GuardCallback()])

Why a callback alone is not enough, and what this one does instead: the Trainer clips the
gradients *before* any callback sees them (``on_pre_optimizer_step`` comes after clipping), and
with a NaN norm clipping multiplies every gradient by NaN; with huge finite gradients it turns
an overflow into NaN or into zeros. Then it calls ``optimizer.step()`` unconditionally. So at
``on_train_begin`` the callback finds its Trainer and, for the duration of ``train()``, wraps
five of the Trainer's methods on that *instance* (the class is untouched):

- ``_clip_grad_norm`` / ``_get_grad_norm``: the guard computes the pre-clip norm in one fused
  pass, decides (one host sync), and clips with that norm only if the step will be applied;
- ``optimizer.step``: not called at all on a skipped step; accelerate's
  ``optimizer_step_was_skipped`` is set, so the Trainer does not advance the LR scheduler;
- ``training_step``: feeds the micro-batch loss and supervised-token count to the guard (device
  tensors, no sync), and hands it the micro-batch (``Guard.observe_batch``: ``sample_ids``
  popped, the dict kept by reference for attribution);
- ``log``: adds the ``guard/*`` counters to every training log (so TensorBoard / W&B get them);
- ``train``: re-raises :class:`~finitetune.NonFiniteHalt` after a halted run has finished
  cleanly (``on_train_end`` of every callback ran, logs were flushed).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from finitetune.config import GuardConfig
from finitetune.errors import ConfigError
from finitetune.guard.guard import Guard
from finitetune.guard.policy import Action, StepOutcome
from finitetune.numerics import IGNORE_INDEX

__all__ = ["GuardCallback"]

_GUARD_ATTR = "_finitetune_guard"
_HALT_ATTR = "_finitetune_halt"


def _find_trainer() -> Trainer | None:
    """The Trainer whose method is calling this callback (callbacks are not given the Trainer)."""
    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        for _ in range(16):
            if f is None:
                return None
            candidate = f.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            f = f.f_back
        return None
    finally:
        del frame


class GuardCallback(TrainerCallback, ExportableState):
    """Make a ``Trainer`` truly skip non-finite / spiking steps; log and checkpoint the guard.

    What it changes in the Trainer, for the duration of ``train()``:

    - **Clipping is taken over.** The Trainer's ``_clip_grad_norm`` does not run. The guard
      clips to ``GuardConfig.max_grad_norm`` if set, else to ``args.max_grad_norm``, with the
      pre-clip norm it already computed and only after deciding to apply the step; on clean
      steps the result is bit-identical to the Trainer's own clipping. The logged ``grad_norm``
      is the pre-clip norm (NaN on a step skipped for NaN gradients).
    - **A skip is a skip.** ``optimizer.step()`` is not called, so parameters and every
      optimizer-state entry (moments, ``step``) stay bit-identical and no weight decay applies.
      The LR scheduler does not advance on a skipped step (``scheduler_on_skip=True`` to
      change that). ``state.global_step`` still counts the step: it is the data position, so
      ``max_steps``, logging, saving and resuming are unchanged; the optimizer's
      ``state["step"]`` and the scheduler count *applied* steps.
    - **Logs** get ``guard/skipped``, ``guard/nonfinite``, ``guard/spikes``,
      ``guard/rollbacks``, ``guard/no_valid_tokens``, ``guard/empty_micro_batches``,
      ``guard/consecutive_skips`` and ``guard/lr_scale`` (cumulative).
    - **Events**: every step that is not simply applied appends one strict-JSON line to
      ``<output_dir>/events.jsonl`` (``args.output_dir`` unless given) and logs one warning.
    - **Halt**: training stops at the end of that step (other callbacks still get
      ``on_train_end``) and ``trainer.train()`` raises :class:`~finitetune.NonFiniteHalt`.
    - **Checkpoints** carry the guard's counters and spike windows (in ``trainer_state.json``
      under ``stateful_callbacks``); resuming restores them.

    Distributed: DDP (``torchrun``, ``accelerate launch``) and FSDP2 are supported; every rank
    takes the same decision from one all-reduce per step, and rank 0 writes the events.
    DeepSpeed and FSDP1 raise :class:`~finitetune.ConfigError` at ``on_train_begin``.

    Args:
        config: :class:`~finitetune.GuardConfig` (or its dict form); default settings if None.
        output_dir: where ``events.jsonl`` goes; default ``args.output_dir``.
        on_fault: passed to :class:`~finitetune.Guard` (attribution hook).
    """

    def __init__(
        self, config: GuardConfig | Mapping[str, Any] | None = None, *,
        output_dir: str | None = None, on_fault: Any = None,
    ) -> None:
        if isinstance(config, Mapping):
            config = GuardConfig(**config)
        self.config = config if config is not None else GuardConfig()
        self.output_dir = output_dir
        self.on_fault = on_fault
        self.guard: Guard | None = None
        self.trainer: Trainer | None = None
        self._pending: StepOutcome | None = None
        self._hold_scheduler = False
        self._raise_at_end = False
        self._patches: list[tuple[Any, str, Any]] = []

    # ---- binding ----------------------------------------------------------------------------
    def bind(self, trainer: Trainer) -> GuardCallback:
        """Attach to ``trainer`` (done automatically; call it only for a Trainer-like loop that
        invokes callbacks from somewhere other than a Trainer method)."""
        self.trainer = trainer
        if not getattr(trainer, "_finitetune_wrapped", False):
            trainer._finitetune_wrapped = True
            self._wrap_train_and_log(trainer)
        return self

    @staticmethod
    def _wrap_train_and_log(trainer: Trainer) -> None:
        train, log = trainer.train, trainer.log

        def guarded_train(*args: Any, **kwargs: Any) -> Any:
            setattr(trainer, _HALT_ATTR, None)
            result = train(*args, **kwargs)
            halt = getattr(trainer, _HALT_ATTR, None)
            if halt is not None:
                raise halt
            return result

        def guarded_log(logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
            guard = getattr(trainer, _GUARD_ATTR, None)
            if guard is not None and ("loss" in logs or "train_runtime" in logs):
                logs.update(guard.log_counters())
            return log(logs, *args, **kwargs)

        trainer.train = guarded_train
        trainer.log = guarded_log

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            trainer = _find_trainer()
            if trainer is not None:
                self.bind(trainer)

    # ---- train begin / end ------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = _find_trainer() or self.trainer
        if trainer is None:
            raise ConfigError(
                "GuardCallback could not find its Trainer; call callback.bind(trainer) first."
            )
        # Added after Trainer.__init__ (add_callback): this train() call is not wrapped yet, so
        # a halt is raised from on_train_end instead of after train() returns.
        self._raise_at_end = not getattr(trainer, "_finitetune_wrapped", False)
        self.bind(trainer)
        _check_parallelism(trainer, args)
        optimizer = trainer.optimizer
        max_norm = self.config.max_grad_norm
        scaler = getattr(optimizer, "scaler", None)
        guard = Guard(trainer.model, optimizer, self.config, trainer.lr_scheduler, scaler=scaler,
                      output_dir=self.output_dir or args.output_dir, on_fault=self.on_fault)
        guard.max_grad_norm = float(args.max_grad_norm if max_norm is None else max_norm)
        saved = self.__dict__.pop("guard_state", None)  # set by the Trainer's own restore
        if saved is None and state.global_step > 0:
            data = (state.stateful_callbacks or {}).get(type(self).__name__)
            data = data[0] if isinstance(data, list) and data else data
            saved = (data or {}).get("attributes", {}).get("guard_state")
        if saved:
            guard.load_state_dict(saved)
        guard.counters["steps"] = state.global_step
        self.guard = guard
        setattr(trainer, _GUARD_ATTR, guard)
        self._pending, self._hold_scheduler = None, False
        self._install(trainer, optimizer)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.trainer is not None and getattr(self.trainer, _HALT_ATTR, None) is not None:
            control.should_training_stop = True
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._uninstall()
        halt = getattr(self.trainer, _HALT_ATTR, None) if self.trainer is not None else None
        if halt is not None and self._raise_at_end:
            setattr(self.trainer, _HALT_ATTR, None)
            raise halt

    # ---- ExportableState --------------------------------------------------------------------
    def state(self) -> dict:
        """Saved into each checkpoint's ``trainer_state.json`` (strict-JSON-safe numbers)."""
        return {
            "args": {"config": self.config.to_dict()},
            "attributes": {"guard_state": self.guard.state_dict() if self.guard else None},
        }

    # ---- the wrapped Trainer methods ---------------------------------------------------------
    def _install(self, trainer: Trainer, optimizer: Any) -> None:
        self._uninstall()
        guard = self.guard
        shifts = getattr(trainer, "_loss_shifts_labels", True)
        training_step = trainer.training_step

        def guarded_training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            # pops the collator's sample_ids (the model never sees them); keeps the inputs dict
            # by reference for attribution when an on_fault hook is set (cleared every step)
            inputs = guard.observe_batch(inputs)
            tokens = _supervised_tokens(inputs, shifts)
            guard.work_seconds += time.perf_counter() - t0
            loss = training_step(model, inputs, *args, **kwargs)
            # The Trainer's returned losses (already divided by the window's token count or by
            # the accumulation steps) add up to the step's loss, as its own log does.
            guard.observe_loss(loss, tokens, window_normalized=True)
            return loss

        def guarded_clip(model: Any) -> float:
            return self._check()

        def guarded_get_norm(model: Any, grad_norm: Any = None) -> Any:
            return self._check() if grad_norm is None else grad_norm

        step = optimizer.step

        # wraps(): keeps the marker torch's LR scheduler puts on optimizer.step (else it warns
        # that step was overridden).
        @functools.wraps(step)
        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            outcome, self._pending = self._pending, None
            if outcome is None:  # the Trainer stepped without asking for the norm: decide now
                self._check()
                outcome, self._pending = self._pending, None
            if outcome.applied:
                if hasattr(optimizer, "_is_overflow"):
                    optimizer._is_overflow = False
                return step(*args, **kwargs)
            if getattr(optimizer, "scaler", None) is not None:
                optimizer.scaler.update()  # lower the fp16 scale, reset its unscale state
            if not self.config.scheduler_on_skip:
                if hasattr(optimizer, "_is_overflow"):
                    optimizer._is_overflow = True  # -> Trainer skips lr_scheduler.step()
                else:
                    self._hold_scheduler = True
            return None

        self._patch(trainer, "training_step", guarded_training_step)
        self._patch(trainer, "_clip_grad_norm", guarded_clip)
        self._patch(trainer, "_get_grad_norm", guarded_get_norm)
        self._patch(optimizer, "step", guarded_step)
        scheduler = trainer.lr_scheduler
        if scheduler is not None and not hasattr(optimizer, "_is_overflow"):
            sched_step = scheduler.step

            def held_step(*args: Any, **kwargs: Any) -> Any:
                if self._hold_scheduler:
                    self._hold_scheduler = False
                    return None
                return sched_step(*args, **kwargs)

            self._patch(scheduler, "step", held_step)

    def _check(self) -> float:
        trainer = self.trainer
        trainer.accelerator.unscale_gradients()  # fp16 AMP: true gradients first (else no-op)
        outcome = self.guard.check(step=trainer.state.global_step + 1)
        self._pending = outcome
        if outcome.action == Action.HALT:
            setattr(trainer, _HALT_ATTR, self.guard.halt_error(outcome))
        return outcome.grad_norm  # a host float already: logging it costs no further sync

    def _patch(self, obj: Any, name: str, value: Any) -> None:
        self._patches.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def _uninstall(self) -> None:
        for obj, name, old in reversed(self._patches):
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, old)
        self._patches = []


_MISSING = object()


def _check_parallelism(trainer: Trainer, args: Any) -> None:
    """Refuse, at start-up, the set-ups the guard cannot make safe (each message names a fix).

    Supported: one device, DDP (``torchrun`` / ``accelerate launch``; gradients replicated) and
    FSDP2 (gradients are DTensor shards; the guard adds up the squared shard norms). DeepSpeed
    clips and steps inside its engine; FSDP1's flat shards are not read by the guard; and on
    CPU accelerate silently drops the Trainer's FSDP option and trains with DDP, which would
    leave a user believing the model is sharded.
    """
    import os

    if getattr(trainer, "is_deepspeed_enabled", False):
        raise ConfigError("GuardCallback does not support DeepSpeed: its engine clips and steps "
                          "the optimizer itself. Train with DDP or FSDP2, or remove the callback.")
    fsdp_requested = bool(getattr(args, "fsdp", None)) or (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")
    if getattr(trainer, "is_fsdp_enabled", False):
        if not getattr(trainer.accelerator, "is_fsdp2", False):
            raise ConfigError("GuardCallback supports FSDP2 only (FSDP1 keeps flat-parameter "
                              "shards the guard does not read): set fsdp_config="
                              "{'fsdp_version': 2} (accelerate: --fsdp_version 2).")
    elif fsdp_requested:
        raise ConfigError("FSDP was requested but accelerate runs this Trainer without it (on "
                          "CPU it falls back to DDP without a word): remove the fsdp option to "
                          "train with DDP, or run on GPUs. For sharding on CPU/gloo, use "
                          "torch.distributed.fsdp.fully_shard with finitetune.Guard in a plain "
                          "loop.")


def _supervised_tokens(inputs: Any, shifts: bool) -> torch.Tensor | None:
    """Supervised (shifted) tokens of one micro-batch, counted as the Trainer counts them for
    ``num_items_in_batch``; a device tensor, no sync. None without labels."""
    if not isinstance(inputs, Mapping):
        return None
    labels = inputs.get("shift_labels")
    if labels is None:
        labels = inputs.get("labels")
        if not isinstance(labels, torch.Tensor):
            return None
        if shifts:
            labels = labels[..., 1:]
    return labels.ne(IGNORE_INDEX).sum()

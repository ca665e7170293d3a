"""``GuardCallback``: the gradient guard for ``transformers.Trainer`` and TRL's trainers, one line.

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[GuardCallback()])

Why a callback alone is not enough: the Trainer clips the gradients *before* any callback sees
them (``on_pre_optimizer_step`` comes after clipping); with a NaN norm clipping multiplies every
gradient by NaN, and with huge finite gradients it turns an overflow into zeros, a step that
would then be applied. Then it calls ``optimizer.step()`` unconditionally. So the callback is
the front door to :func:`~finitetune.integrations.hf.mixin.guarded`: when the Trainer is built
(or the callback added), the callback is bound to it with :meth:`GuardCallback.set_trainer` and
the Trainer instance becomes ``guarded(type(trainer))``, whose overrides take clipping over and
feed the guard. At ``on_train_begin`` the callback checks every seam the guard relies on
(:mod:`~finitetune.integrations.hf.seams`) and starts a
:class:`~finitetune.integrations.hf.session.GuardSession`, which owns the optimizer's and
the scheduler's ``step`` until training ends, however it ends.

How the callback finds its Trainer: transformers hands callbacks the model, optimizer and
scheduler, never the Trainer. Importing this module therefore adds one step after
``transformers.Trainer.__init__`` and ``Trainer.add_callback`` (class level, once per process):
a Trainer that holds a ``GuardCallback`` calls ``callback.set_trainer(self)``. Trainers without
one are untouched. ``guarded(TrainerClass)`` is the explicit alternative.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from finitetune.errors import ConfigError
from finitetune.guard.attribution import AttributionConfig, Attributor
from finitetune.guard.guard import Guard
from finitetune.integrations.hf import mixin as _mixin
from finitetune.integrations.hf.checkpoint_callback import CheckpointCallback
from finitetune.integrations.hf.seams import check_trainer, shifts_labels
from finitetune.integrations.hf.session import GuardSession
from finitetune.settings.config import GuardConfig

__all__ = ["GuardCallback", "GuardedTrainerMixin", "adopt", "guard_of", "guarded"]

guard_of = _mixin.guard_of
_CACHE: dict[type, type] = {}


class GuardCallback(TrainerCallback, ExportableState):
    """Make a ``Trainer`` truly skip non-finite / spiking steps; log and checkpoint the guard.

    What it changes in the Trainer, for the duration of ``train()``:

    - **Clipping is taken over.** The Trainer's own clipping does not run. The guard
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
      ``guard/consecutive_skips`` and ``guard/lr_scale`` (cumulative); a window with a handled
      step logs the loss of its applied steps, never the Trainer's ``0.0`` for a NaN
      (:mod:`~finitetune.integrations.hf.session`).
    - **Events**: every step that is not simply applied appends one strict-JSON line to
      ``<output_dir>/events.jsonl`` (``args.output_dir`` unless given) and logs one warning.
      Attribution is on by default: the line names the first non-finite module, the
      parameters, the samples and a verdict (it costs nothing until a step fails).
    - **Halt**: training stops at the end of that step (other callbacks still get
      ``on_train_end``) and ``trainer.train()`` raises :class:`~finitetune.NonFiniteHalt`.
    - **Checkpoint protection** comes with it (``checkpoints=True``): see the argument.
    - **Checkpoints** carry the guard's counters and spike windows (in ``trainer_state.json``
      under ``stateful_callbacks``); resuming restores them. A callback the Trainer rebuilds
      from a checkpoint (``restore_callback_states_from_checkpoint``) keeps the attribution
      hook and output directory of the one it replaces.

    Distributed: DDP (``torchrun``, ``accelerate launch``), FSDP2 and DeepSpeed ZeRO-1/2/3
    (:mod:`finitetune.integrations.deepspeed.engine`: the decision inside DeepSpeed's own step) are
    supported; every rank takes the same decision from one all-reduce per step, and rank 0
    writes the events. FSDP1 raises :class:`~finitetune.ConfigError` at ``on_train_begin``.

    Args:
        config: :class:`~finitetune.GuardConfig` (or its dict form); default settings if None.
        output_dir: where ``events.jsonl`` and ``faults/`` go; default ``args.output_dir``.
        on_fault: the guard's fault hook (a :class:`~finitetune.guard.hooks.FaultHook` such as
            an :class:`~finitetune.guard.attribution.Attributor`, or a plain callable);
            replaces the default attribution.
        attribution: ``True`` (default): an ``Attributor`` on the Trainer's model; an
            :class:`~finitetune.guard.attribution.AttributionConfig` to bound it; ``False``:
            none. Ignored when ``on_fault`` is given.
        checkpoints: ``True`` (default): the Trainer also gets a
            :class:`~finitetune.integrations.hf.checkpoint_callback.CheckpointCallback` with
            the same settings (no save holding NaN/inf, the last healthy checkpoint kept
            against ``save_total_limit``, ``resume_from_checkpoint=True`` takes the newest
            healthy one) unless it has one; ``False``: checkpoints as plain transformers.
    """

    def __init__(
        self, config: GuardConfig | Mapping[str, Any] | None = None, *,
        output_dir: str | os.PathLike | None = None, on_fault: Any = None,
        attribution: bool | AttributionConfig | Mapping[str, Any] = True,
        checkpoints: bool = True,
    ) -> None:
        if isinstance(config, Mapping):
            config = GuardConfig(**config)
        if isinstance(attribution, Mapping):
            attribution = AttributionConfig(**attribution)
        self.config = config if config is not None else GuardConfig()
        self.output_dir = output_dir
        self.on_fault = on_fault
        self.attribution = attribution
        self.checkpoints = checkpoints
        self.trainer: Any = None
        self.guard: Guard | None = None
        """The guard of the current or last ``train()`` call (counters, last outcome)."""
        self._raise_at_end = False

    # ---- binding ------------------------------------------------------------------------------
    def set_trainer(self, trainer: Any) -> GuardCallback:
        """Bind to ``trainer`` and make it guarded (done for you when the Trainer is built with
        this callback or it is added with ``add_callback``). Returns ``self``.

        Checks every seam the guard needs here, at construction, so an unsupported release
        or set-up is refused before any data is loaded or step taken."""
        check_trainer(trainer)
        previous = trainer.__dict__.get("_finitetune_callback")
        if previous is not None and previous is not self \
                and all(cb is not previous for cb in trainer.callback_handler.callbacks):
            # The Trainer rebuilt this callback from a checkpoint and dropped `previous`: keep
            # the wiring JSON could not carry (the hook object, where events go).
            self.on_fault = self.on_fault if self.on_fault is not None else previous.on_fault
            self.output_dir = self.output_dir or previous.output_dir
            self.attribution = previous.attribution
        self.trainer = trainer
        adopt(trainer)
        trainer.__dict__["_finitetune_callback"] = self
        if self.checkpoints:
            self._protect_checkpoints(trainer)
        return self

    def _protect_checkpoints(self, trainer: Any) -> None:
        """The one line protects checkpoints too: a Trainer holding this callback gets a
        :class:`~finitetune.integrations.hf.checkpoint_callback.CheckpointCallback` with the
        same settings (no poisoned save, the healthy one kept against rotation, healthy
        resume), unless it has one already or ``checkpoints=False``."""
        handler = trainer.callback_handler
        if any(isinstance(cb, CheckpointCallback) for cb in handler.callbacks):
            return
        protect = CheckpointCallback(self.output_dir, config=self.config)
        handler.add_callback(protect)
        protect.set_trainer(trainer)

    # ---- train begin / end --------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer or _mixin.trainer_holding(self)
        if trainer is None:
            raise ConfigError(
                "GuardCallback is not bound to a Trainer: pass it in Trainer(callbacks=[...]) "
                "or trainer.add_callback(...), call callback.set_trainer(trainer), or use "
                "finitetune.integrations.hf.callback.guarded(TrainerClass).")
        self.set_trainer(trainer)
        others = [cb for cb in trainer.callback_handler.callbacks
                  if isinstance(cb, GuardCallback) and cb is not self]
        if others:
            raise ConfigError("this Trainer has more than one GuardCallback; keep one.")
        self._check_disk_rollback(trainer)
        previous = trainer.__dict__.pop("_finitetune_session", None)
        if previous is not None:
            previous.close()
        self.guard = self._make_guard(trainer, args, state)
        session_cls: type[GuardSession] = GuardSession
        if getattr(trainer, "is_deepspeed_enabled", False):  # the decision inside ZeRO's step
            from finitetune.integrations.deepspeed.engine import ZeroSession as session_cls
        session = session_cls(trainer, self.guard, shifts_labels=shifts_labels(trainer))
        trainer.__dict__["_finitetune_session"] = session
        # bound late (the callback reached the Trainer some other way): no train() wrapper
        # will raise the halt, so on_train_end does
        self._raise_at_end = not trainer.__dict__.get("_finitetune_in_train", False)

    def _check_disk_rollback(self, trainer: Any) -> None:
        """``rollback_to='disk'`` restores the checkpoints a ``CheckpointCallback`` keeps;
        without one set the same way every rollback would silently be a skip."""
        if not (self.config.needs_snapshots and self.config.rollback_to == "disk"):
            return
        if not any(isinstance(cb, CheckpointCallback) and cb.config.rollback_to == "disk"
                   for cb in trainer.callback_handler.callbacks):
            raise ConfigError(
                "GuardConfig(rollback_to='disk') rolls back to the run's checkpoints, which "
                "CheckpointCallback checks and restores, but this Trainer has no "
                "CheckpointCallback with rollback_to='disk': add "
                "CheckpointCallback(config=<the same GuardConfig>) to its callbacks, or use "
                "rollback_to='memory'")

    def _make_guard(self, trainer: Any, args: Any, state: Any) -> Guard:
        optimizer = trainer.optimizer
        out = self.output_dir or args.output_dir
        clip = self.config.max_grad_norm
        if getattr(trainer, "is_deepspeed_enabled", False):
            from finitetune.integrations.deepspeed.engine import make_guard

            guard: Guard = make_guard(trainer, self.config, output_dir=out,
                                      on_fault=self._fault_hook(trainer.model, out),
                                      start_step=state.global_step)
        else:
            guard = Guard(trainer.model, optimizer, self.config, trainer.lr_scheduler,
                          scaler=getattr(optimizer, "scaler", None), output_dir=out,
                          on_fault=self._fault_hook(trainer.model, out),
                          max_grad_norm=args.max_grad_norm if clip is None else clip,
                          start_step=state.global_step)
        saved = self.__dict__.pop("guard_state", None)  # set by the Trainer's own restore
        if saved is None and state.global_step > 0:
            data = (state.stateful_callbacks or {}).get(type(self).__name__)
            data = data[0] if isinstance(data, list) and data else data
            saved = (data or {}).get("attributes", {}).get("guard_state")
        if saved:
            guard.load_state_dict(saved)
        return guard

    def _fault_hook(self, model: Any, out: Any) -> Any:
        if self.on_fault is not None:
            return self.on_fault
        if self.attribution is False:
            return None
        config = self.attribution if isinstance(self.attribution, AttributionConfig) else None
        return Attributor(model, out, config=config)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        session = self._session()
        if session is not None and session.halt is not None:
            control.should_training_stop = True
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        session = self._session()
        if session is None:
            return
        session.close()  # nothing wrapped and nothing logged by the guard after this
        if session.halt is not None and self._raise_at_end:
            self.trainer.__dict__.pop("_finitetune_session", None)
            raise session.halt

    def _session(self) -> GuardSession | None:
        return self.trainer.__dict__.get("_finitetune_session") if self.trainer else None

    # ---- ExportableState ----------------------------------------------------------------------
    def state(self) -> dict:
        """Saved into each checkpoint's ``trainer_state.json`` (strict-JSON-safe numbers)."""
        attribution: Any = self.attribution
        if isinstance(attribution, AttributionConfig):
            from dataclasses import asdict

            attribution = asdict(attribution)
        return {
            "args": {"config": self.config.to_dict(), "attribution": attribution,
                     "checkpoints": self.checkpoints},
            "attributes": {"guard_state": self.guard.state_dict() if self.guard else None},
        }


class GuardedTrainerMixin(_mixin.GuardOverrides):
    """Put first in a Trainer's bases: ``class T(GuardedTrainerMixin, SFTTrainer)``.

    The guard's overrides (:class:`~finitetune.integrations.hf.mixin.GuardOverrides`), and a
    default :class:`GuardCallback` when the Trainer is built without one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        handler = self.callback_handler  # type: ignore[attr-defined]
        if not any(isinstance(cb, GuardCallback) for cb in handler.callbacks):
            handler.add_callback(GuardCallback())
        _mixin.bind_callbacks(self)


def guarded(trainer_cls: type) -> type:
    """``trainer_cls`` with the guard built in (cached: one class per Trainer class).

    ``guarded(Trainer)``, ``guarded(Seq2SeqTrainer)``, ``guarded(trl.DPOTrainer)``, ... The
    result is a subclass, so ``isinstance`` checks and the class's own overrides still hold.
    """
    if issubclass(trainer_cls, GuardedTrainerMixin):
        return trainer_cls
    cls = _CACHE.get(trainer_cls)
    if cls is None:
        name = f"Guarded{trainer_cls.__name__}"
        cls = type(name, (GuardedTrainerMixin, trainer_cls),
                   {"__module__": __name__, "__qualname__": name,
                    "__doc__": f"{trainer_cls.__name__} with finitetune's gradient guard."})
        _CACHE[trainer_cls] = cls
    return cls


def adopt(trainer: Any) -> None:
    """Make an existing Trainer instance guarded: its class becomes ``guarded(type(trainer))``
    (same state, same methods, the mixin's overrides in front). Idempotent."""
    if not isinstance(trainer, GuardedTrainerMixin):
        trainer.__class__ = guarded(type(trainer))
    _mixin.remember(trainer)


_mixin.install_construction_hook()

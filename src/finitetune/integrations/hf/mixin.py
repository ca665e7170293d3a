"""The gradient guard inside a Trainer class: ``GuardOverrides``, and how callbacks find their
Trainer.

``GuardOverrides`` holds the Trainer methods the guard overrides; the public mixin built on it
(``GuardedTrainerMixin``, ``guarded(TrainerClass)``) lives with ``GuardCallback`` in
:mod:`~finitetune.integrations.hf.callback`, because a guarded Trainer needs a callback and the
callback makes Trainers guarded: keeping the overrides here, below both, is what keeps the two
modules from importing each other. One implementation serves every way in:

- ``guarded(SFTTrainer)(model=..., args=..., ...)`` or ``class MyTrainer(GuardedTrainerMixin,
  Seq2SeqTrainer)``: explicit, for ``transformers.Trainer``, ``Seq2SeqTrainer`` and every TRL
  trainer. Without a ``GuardCallback`` among its callbacks the Trainer gets a default one.
- ``Trainer(..., callbacks=[GuardCallback()])``, the one-line front door: transformers does not
  hand the Trainer to its callbacks, so importing :mod:`finitetune.integrations.hf.callback` adds one
  post-construction step to ``transformers.Trainer.__init__`` and ``Trainer.add_callback``
  (class level, once per process, see :func:`install_construction_hook`). A Trainer that holds a
  ``GuardCallback`` then calls ``callback.set_trainer(self)``, which makes the instance's class
  ``guarded(type(trainer))``. A Trainer without one is left exactly as it was.
- ``finitetune run``: the same hook, in a mode that adds a ``GuardCallback`` to every Trainer.

The overrides are public Trainer methods only: ``train`` (undo every wrap on every exit path,
then raise a halt), ``training_step`` (feed the guard each micro-batch's loss and token count)
and ``log`` (guard counters, honest loss). Clipping is taken over where every transformers
release clips, the Trainer's Accelerator's ``clip_grad_norm_``, by the session
(:mod:`~finitetune.integrations.hf.session`). Each override does nothing but call the
Trainer's own method unless a guard session is active, i.e. between the ``GuardCallback``'s
``on_train_begin`` and the end of ``train()``: removing the callback un-guards the Trainer.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

from finitetune.integrations.hf.session import GuardSession

__all__ = ["GuardOverrides", "bind_callbacks", "guard_of", "install_construction_hook", "remember",
           "trainer_holding"]

_TRAINERS: weakref.WeakSet = weakref.WeakSet()
"""Trainers adopted in this process: where a callback restored from a checkpoint (a new
instance the Trainer builds itself) finds the Trainer it belongs to."""
_HOOK_MARK = "_finitetune_construction_hook"
_auto_attach: Callable[[Any], None] | None = None


class GuardOverrides:
    """The Trainer methods the guard overrides (the base of ``GuardedTrainerMixin``).

    The overrides are inert until the ``GuardCallback`` starts a session in ``on_train_begin``;
    the Trainer's own methods then run inside them (see the module docstring).
    """

    _finitetune_session: GuardSession | None = None

    def _finitetune_active(self) -> GuardSession | None:
        session = self._finitetune_session
        return session if session is not None and not session.closed else None

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; afterwards (also after an exception) every wrap is undone, and a
        run the guard halted raises :class:`~finitetune.NonFiniteHalt` once it has finished
        cleanly (callbacks' ``on_train_end`` ran, logs flushed)."""
        self.__dict__["_finitetune_in_train"] = True
        try:
            result = super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.__dict__.pop("_finitetune_in_train", None)
            session = self.__dict__.pop("_finitetune_session", None)
            if session is not None:
                session.close()
        if session is not None and session.halt is not None:
            raise session.halt
        return result

    def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        session = self._finitetune_active()
        if session is None:
            return super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]
        inputs, tokens = session.before_micro_batch(inputs)
        loss = super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]
        session.after_micro_batch(loss, tokens)
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        session = self._finitetune_active()
        if session is not None:
            session.amend_log(logs)
        return super().log(logs, *args, **kwargs)  # type: ignore[misc]


def remember(trainer: Any) -> None:
    """Note ``trainer`` as guarded in this process (see :func:`trainer_holding`)."""
    _TRAINERS.add(trainer)


def trainer_holding(callback: Any) -> Any:
    """The adopted Trainer whose callbacks include ``callback`` (None if there is none)."""
    for trainer in list(_TRAINERS):
        handler = getattr(trainer, "callback_handler", None)
        if handler is not None and any(cb is callback for cb in handler.callbacks):
            return trainer
    return None


def guard_of(trainer: Any) -> Any:
    """The :class:`~finitetune.Guard` of ``trainer``'s current or last ``train()`` (or None)."""
    callback = trainer.__dict__.get("_finitetune_callback")
    return callback.guard if callback is not None else None


def bind_callbacks(trainer: Any) -> None:
    """``set_trainer(trainer)`` on every callback that has one (``GuardCallback``,
    ``CheckpointCallback``, ...) and is not bound to it yet."""
    for cb in trainer.callback_handler.callbacks:
        bind = getattr(cb, "set_trainer", None)
        if callable(bind) and getattr(cb, "trainer", None) is not trainer:
            bind(trainer)


def install_construction_hook(auto_attach: Callable[[Any], None] | None = None) -> None:
    """Bind every ``GuardCallback`` to the Trainer it is given to (class-level, idempotent).

    Wraps ``transformers.Trainer.__init__`` and ``Trainer.add_callback`` once per process: after
    the original, a Trainer holding a ``GuardCallback`` calls ``callback.set_trainer(self)``.
    ``auto_attach`` (``finitetune run``): called with every new Trainer first, to add the guard
    (and whatever else the run asked for) to Trainers the program built without one.
    """
    global _auto_attach
    from transformers import Trainer

    if auto_attach is not None:
        _auto_attach = auto_attach
    if getattr(Trainer.__init__, _HOOK_MARK, False):
        return
    init, add_callback = Trainer.__init__, Trainer.add_callback

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if _auto_attach is not None:
            _auto_attach(self)
        bind_callbacks(self)

    @functools.wraps(add_callback)
    def add_callback_and_bind(self: Any, callback: Any) -> None:
        add_callback(self, callback)
        bind_callbacks(self)

    setattr(__init__, _HOOK_MARK, True)
    Trainer.__init__ = __init__  # type: ignore[method-assign]
    Trainer.add_callback = add_callback_and_bind  # type: ignore[method-assign]
